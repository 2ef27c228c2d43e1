"""Typer option types shared by the commands of ``cli.py``: one definition per flag, so every
command that takes ``--device`` (or ``--output``, ``--json``, ...) spells and documents it alike."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from loraforge.kernels import SVD_METHODS


class CheckpointType(str, Enum):
    safetensors = "safetensors"
    pytorch = "pytorch"


SvdMethod = Enum("SvdMethod", {name: name for name in SVD_METHODS}, type=str)
SVD_HELP = "; ".join(f"{m.name}: {m.help}" for m in SVD_METHODS.values())


# ---- option aliases shared by commands ----
SourceModel = Annotated[
    str,
    typer.Option(
        "--source-model",
        help="Base checkpoint: a .safetensors file, a shard directory, or a .pt/.pth file.",
    ),
]
SourceType = Annotated[CheckpointType, typer.Option("--source-type")]
OutputPath = Annotated[
    str, typer.Option("--output", help="Output file; shards and the index are named after it.")
]
OutputFormat = Annotated[CheckpointType, typer.Option("--output-format")]
OutputDtype = Annotated[
    str, typer.Option("--output-dtype", help="float32|fp32|float16|fp16|bfloat16|bf16")
]
MaxShardSize = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size", help="e.g. 5GB: Hugging Face shards + index instead of one file."
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N")]
Workers = Annotated[
    int | None,
    typer.Option(
        "--workers", min=1, help="Tensors processed at once (default: cores, at most 16)."
    ),
]
Scheduler = Annotated[
    str | None,
    typer.Option(
        "--scheduler", help="Address (tcp://host:port) or scheduler file of a running Dask cluster."
    ),
]
Gpus = Annotated[
    str | None,
    typer.Option(
        "--gpus",
        metavar="all|0,1,...",
        help="One Dask worker process per GPU, pinned to it (dask-cuda's LocalCUDACluster when "
        "installed); --workers is then threads per GPU worker (default 2: one tensor is read "
        "while another is in the kernel).",
    ),
]
JsonOutput = Annotated[
    bool,
    typer.Option(
        "--json",
        help="JSON lines on stdout, one per event (start, cluster, tensor, write, summary, "
        "error), for batch jobs; no bar or table.",
    ),
]
ReportPath = Annotated[
    str | None,
    typer.Option("--report", help="JSON report path (default: <output stem>.report.json)."),
]
WorkDirOpt = Annotated[
    str | None,
    typer.Option("--work-dir", help="Intermediates for resume (default: <output>.work)."),
]
