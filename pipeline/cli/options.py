"""Typer option types shared by the commands of this package: one definition per flag, so every
command that takes ``--device`` (or ``--output``, ``--json``, ...) spells and documents it alike."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from loraforge.kernels import RANK_MODES, SKETCH_CHOICES, SVD_METHODS

from ..io.dtypes import size_in_bytes
from ..lora.styles import DEFAULT_STYLE, KEY_STYLE_HELP, KEY_STYLES


class CheckpointType(str, Enum):
    safetensors = "safetensors"
    pytorch = "pytorch"


SvdMethod = Enum("SvdMethod", {name: name for name in SVD_METHODS}, type=str)
KeyStyleName = Enum("KeyStyleName", {name: name for name in KEY_STYLES}, type=str)
SVD_HELP = "; ".join(f"{m.name}: {m.help}" for m in SVD_METHODS.values())
SketchPrecision = Enum("SketchPrecision", {name: name for name in SKETCH_CHOICES}, type=str)
RankModeName = Enum("RankModeName", {name: name for name in RANK_MODES}, type=str)
RANK_MODE_HELP = "; ".join(
    f"{m.name}: {m.help}" + (f" ({m.flag})" if m.flag else "") for m in RANK_MODES.values()
)


# ---- option aliases shared by commands ----
SourceModel = Annotated[
    str,
    typer.Option(
        "--source-model",
        help="Base checkpoint: a .safetensors file, a shard directory, or a .pt/.pth file.",
    ),
]
SourceType = Annotated[CheckpointType, typer.Option("--source-type")]
TargetModel = Annotated[str, typer.Option("--target-model", help="Fine-tuned checkpoint.")]
TargetType = Annotated[CheckpointType, typer.Option("--target-type")]
LoraType = Annotated[
    CheckpointType | None,
    typer.Option("--lora-type", help="Format of the LoRA files (default: from each name)."),
]
OutputPath = Annotated[
    str, typer.Option("--output", help="Output file; shards and the index are named after it.")
]
OutputFormat = Annotated[CheckpointType, typer.Option("--output-format")]
OutputDtype = Annotated[
    str, typer.Option("--output-dtype", help="float32|fp32|float16|fp16|bfloat16|bf16")
]


def _memory_size(value: str | None) -> int | None:
    """``--max-memory`` in bytes, refused as a usage error (one line, exit 2) when unreadable
    or below the smallest budget a run can work in."""
    from ..errors import UsageError
    from ..run.memory import MIN_BUDGET

    if value is None:
        return None
    try:
        size = size_in_bytes(value)
    except UsageError:
        raise typer.BadParameter(
            f"cannot read size {value!r}; write e.g. 8GB, 500MB or 16GiB"
        ) from None
    if size < MIN_BUDGET:
        raise typer.BadParameter(f"{value} is below the smallest budget, {MIN_BUDGET // 2**20}MiB")
    return size


MaxMemory = Annotated[
    int | None,
    typer.Option(
        "--max-memory",
        parser=_memory_size,
        metavar="SIZE",
        help="e.g. 8GB: host memory the running tasks may hold together; a tensor larger than "
        "that runs in row blocks (default: 60% of the memory available, cgroup limits included).",
    ),
]
MergeOutputDtype = Annotated[
    str,
    typer.Option(
        "--output-dtype",
        help="float32|fp32|float16|fp16|bfloat16|bf16|fp8_e4m3fn (scaled fp8 in the base's "
        "convention: its scaled weights, or the blocks' linear layers of a base without "
        "scales, with fp32 scales)",
    ),
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

# ---- rank selection (extract, resize) ----
RankMode = Annotated[RankModeName, typer.Option("--rank-mode", help=RANK_MODE_HELP)]
MinRank = Annotated[
    int, typer.Option("--min-rank", help="Floor of every tensor's rank (capped by --rank).")
]
Energy = Annotated[
    float | None,
    typer.Option("--energy", metavar="F", help="energy mode: fraction in (0, 1] of ||delta||^2."),
]
SvRatio = Annotated[
    float | None,
    typer.Option("--sv-ratio", metavar="R", help="ratio mode: keep s_i with s_1/s_i <= R."),
]
SvThreshold = Annotated[
    float | None,
    typer.Option("--sv-threshold", metavar="T", help="threshold mode: keep s_i >= T."),
]
RankBudget = Annotated[
    int | None,
    typer.Option(
        "--rank-budget",
        metavar="N",
        help="budget mode: N parameters in all low-rank factors together (sum of rank*(out+in)).",
    ),
]

# ---- LoRA key names (extract, convert, resize) ----
KeyStyleOpt = Annotated[
    KeyStyleName,
    typer.Option(
        "--key-style",
        help=f"Key names of the written LoRA (default {DEFAULT_STYLE}). {KEY_STYLE_HELP}",
    ),
]

# ---- LoRA inputs (resize, verify) ----
LoraModels = Annotated[
    list[str] | None,
    typer.Option(
        "--lora-model",
        metavar="PATH",
        help="LoRA: a .safetensors or .pt file, a shard directory, or a PEFT adapter "
        "directory (adapter_model.* + adapter_config.json). Repeatable.",
    ),
]
Strengths = Annotated[
    list[str] | None,
    typer.Option(
        "--strength",
        metavar="FLOAT",
        help="Strength of each --lora-model, in the same order (default 1.0). Repeatable.",
    ),
]
LoraConfig = Annotated[
    str | None,
    typer.Option(
        "--config",
        metavar="FILE.json",
        help="LoRAs from a LightX2V inference config, taken whole: its lora_configs "
        '([{"path": ..., "strength": 0.8, "alpha": 16}]) or lora_path + strength_model are '
        "read, its other fields listed once as not used; relative paths are looked up in "
        "the config's directory, then in the working directory.",
    ),
]
ConfigName = Annotated[
    str | None,
    typer.Option(
        "--config-name",
        metavar="NAME",
        help='With --config: the lora_configs entries whose "name" is NAME (Wan2.2 MoE: '
        "high_noise_model or low_noise_model); required when entries are named.",
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bar or summary.")]
AllowNonfinite = Annotated[
    bool,
    typer.Option("--allow-nonfinite", help="Use NaN/Inf in LoRAs anyway; write such results."),
]
Resume = Annotated[bool, typer.Option("--resume/--no-resume", help="Reuse finished intermediates.")]
KeepWork = Annotated[
    bool,
    typer.Option("--keep-work/--no-keep-work", help="Keep the work directory after success."),
]
