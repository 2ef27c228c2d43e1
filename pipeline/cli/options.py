"""Typer option types shared by the commands of this package: one definition per flag, so every
command that takes ``--device`` (or ``--output``, ``--json``, ...) spells and documents it alike."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Annotated

import typer

from loraforge.kernels import RANK_MODES, SVD_METHODS, RankRule
from loraforge.kernels.svd import DEFAULT_MAX_ITER, DEFAULT_TOL

from ..export.ranks import parse_iterations, parse_ranks, rank_rule
from ..extract.options import KernelOptions
from ..io.dtypes import parse_dtype, parse_size
from ..lora.config import MergeConfig, loras_from_arguments
from ..lora.styles import DEFAULT_STYLE, KEY_STYLE_HELP, KEY_STYLES
from ..run.options import RunOptions
from .parameters import OptionSet


class CheckpointType(str, Enum):
    safetensors = "safetensors"
    pytorch = "pytorch"


SvdMethod = Enum("SvdMethod", {name: name for name in SVD_METHODS}, type=str)
KeyStyleName = Enum("KeyStyleName", {name: name for name in KEY_STYLES}, type=str)
SVD_HELP = "; ".join(f"{m.name}: {m.help}" for m in SVD_METHODS.values())
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

    try:
        size = parse_size(value)
    except UsageError:
        raise typer.BadParameter(
            f"cannot read size {value!r}; write e.g. 8GB, 500MB or 16GiB"
        ) from None
    if size is not None and size < MIN_BUDGET:
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
    typer.Option("--allow-nonfinite", help="Use LoRA tensors holding NaN/Inf anyway."),
]
Resume = Annotated[bool, typer.Option("--resume/--no-resume", help="Reuse finished intermediates.")]
KeepWork = Annotated[
    bool,
    typer.Option("--keep-work/--no-keep-work", help="Keep the work directory after success."),
]


# ---- option sets: declared once, expanded into each command that takes them ----
def _run_options(*, json_output: bool = False, **fields) -> RunOptions:
    return RunOptions(json=json_output, **fields)


RUN = OptionSet(
    "run",
    _run_options,
    {
        "device": (Device, "auto"),
        "workers": (Workers, None),
        "scheduler": (Scheduler, None),
        "gpus": (Gpus, None),
        "max_memory": (MaxMemory, None),
        "work_dir": (WorkDirOpt, None),
        "resume": (Resume, True),
        "keep_work": (KeepWork, True),
        "report": (ReportPath, None),
        "quiet": (Quiet, False),
        "json_output": (JsonOutput, False),
    },
)


@dataclass(frozen=True)
class LoraFlags:
    """The LoRAs a command was given, read when ``loras()`` is called (in the command's run,
    so a bad config is a one-line error)."""

    lora_model: list[str] | None
    strength: list[str] | None
    config: str | None
    config_name: str | None
    lora_type: CheckpointType | None

    def loras(self) -> MergeConfig:
        return loras_from_arguments(self.config, self.config_name, self.lora_model, self.strength)

    @property
    def file_format(self) -> str | None:
        """``--lora-type``: the LoRA files' format, or None to tell from each name."""
        return CheckpointType(self.lora_type).value if self.lora_type else None


LORAS = OptionSet(
    "lora_flags",
    LoraFlags,
    {
        "lora_model": (LoraModels, None),
        "strength": (Strengths, None),
        "config": (LoraConfig, None),
        "config_name": (ConfigName, None),
        "lora_type": (LoraType, None),
    },
)


@dataclass(frozen=True)
class LoraOutputFlags:
    """How a LoRA is written (extract, resize): the ranks, the rank rule and the output
    options, checked when ``fields()`` is called (in the command's run)."""

    rank: str
    rank_mode: str
    min_rank: int
    energy: float | None
    sv_ratio: float | None
    sv_threshold: float | None
    rank_budget: int | None
    output_dtype: str
    output_format: CheckpointType
    max_shard_size: str | None
    key_style: str

    @property
    def ranks(self) -> tuple[int, ...]:
        return parse_ranks(self.rank)

    def rule(self) -> RankRule:
        return rank_rule(
            mode=RankModeName(self.rank_mode).value,
            rank=self.ranks[-1],
            min_rank=self.min_rank,
            energy=self.energy,
            sv_ratio=self.sv_ratio,
            sv_threshold=self.sv_threshold,
            rank_budget=self.rank_budget,
        )

    def fields(self) -> dict:
        """The ``export.options.LoraOutput`` fields."""
        parse_dtype(self.output_dtype)
        return {
            "rank_rule": self.rule(),
            "ranks": self.ranks,
            "output_dtype": self.output_dtype.lower(),
            "output_format": CheckpointType(self.output_format).value,
            "max_shard_size": parse_size(self.max_shard_size),
            "key_style": KeyStyleName(self.key_style).value,
        }


Rank = Annotated[
    str,
    typer.Option(
        "--rank",
        metavar="R|R1,R2,...",
        help="LoRA rank: the factorisation rank and every rank mode's cap. Several (16,32,64): "
        "one factorisation at the largest, one file per rank, OUTPUT-STEM-r16.safetensors, ...",
    ),
]
LORA_OUTPUT = OptionSet(
    "output_flags",
    LoraOutputFlags,
    {
        "rank": (Rank, "32"),
        "rank_mode": (RankMode, RankModeName.fixed),
        "min_rank": (MinRank, 1),
        "energy": (Energy, None),
        "sv_ratio": (SvRatio, None),
        "sv_threshold": (SvThreshold, None),
        "rank_budget": (RankBudget, None),
        "output_dtype": (OutputDtype, "bf16"),
        "output_format": (OutputFormat, CheckpointType.safetensors),
        "max_shard_size": (MaxShardSize, None),
        "key_style": (KeyStyleOpt, DEFAULT_STYLE),
    },
)


@dataclass(frozen=True)
class KernelFlags:
    """The SVD flags of ``extract``, checked when ``options(rank)`` is called."""

    svd: str
    oversample: int
    power_iterations: str
    svd_tol: float
    max_power_iterations: int

    def options(self, rank: int) -> KernelOptions:
        return KernelOptions(
            method=SvdMethod(self.svd).value,
            rank=rank,
            oversample=self.oversample,
            n_iter=parse_iterations(self.power_iterations),
            tol=self.svd_tol,
            max_iter=self.max_power_iterations,
        )


PowerIterations = Annotated[
    str,
    typer.Option(
        "--power-iterations",
        metavar="auto|N",
        help="auto: iterate until the captured energy settles (--svd-tol, at most "
        "--max-power-iterations); N: exactly N.",
    ),
]
KERNEL = OptionSet(
    "kernel_flags",
    KernelFlags,
    {
        "svd": (Annotated[SvdMethod, typer.Option("--svd", help=SVD_HELP)], "randomized"),
        "oversample": (Annotated[int, typer.Option("--oversample")], 16),
        "power_iterations": (PowerIterations, "auto"),
        "svd_tol": (
            Annotated[
                float,
                typer.Option(
                    "--svd-tol", help="auto iterations stop when one gains < this of the rest."
                ),
            ],
            DEFAULT_TOL,
        ),
        "max_power_iterations": (
            Annotated[
                int,
                typer.Option("--max-power-iterations", help="Cap of auto power iterations."),
            ],
            DEFAULT_MAX_ITER,
        ),
    },
)
