"""Option sets: the options several commands take together, declared once and expanded into
each command's signature (``parameters.expand``), each building one object: ``RUN`` the
``RunOptions``, ``LORAS`` the LoRAs a command was given, ``LORA_OUTPUT`` how a LoRA is written
(ranks, rank rule, dtype, format, shards, key style), ``KERNEL`` extract's SVD settings. The
objects check their values when asked for them, inside the command's run, so a bad value is a
one-line error there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from loraforge.kernels.svd import DEFAULT_MAX_ITER, DEFAULT_TOL

from ..export.ranks import parse_iterations, parse_ranks, rank_rule
from ..extract.options import KernelOptions
from ..io.dtypes import parse_size
from ..lora.config import MergeConfig, loras_from_arguments
from ..lora.styles import DEFAULT_STYLE
from ..run.options import RunOptions
from .options import (
    SVD_HELP,
    CheckpointType,
    ConfigName,
    Device,
    Energy,
    Gpus,
    JsonOutput,
    KeepWork,
    KeyStyleName,
    KeyStyleOpt,
    LoraConfig,
    LoraModels,
    LoraType,
    MaxMemory,
    MaxShardSize,
    MinRank,
    OutputDtype,
    OutputFormat,
    Quiet,
    RankBudget,
    RankMode,
    RankModeName,
    ReportPath,
    Resume,
    Scheduler,
    SketchPrecision,
    Strengths,
    SvdMethod,
    SvRatio,
    SvThreshold,
    WorkDirOpt,
    Workers,
)
from .parameters import OptionSet


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
    options, checked when ``fields()`` is called and its ``LoraOutput`` built (in the
    command's run)."""

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

    def fields(self) -> dict:
        """The ``export.options.LoraOutput`` fields (which check the dtype, format and style
        together when built)."""
        ranks = parse_ranks(self.rank)
        rule = rank_rule(
            mode=RankModeName(self.rank_mode).value,
            rank=ranks[-1],
            min_rank=self.min_rank,
            energy=self.energy,
            sv_ratio=self.sv_ratio,
            sv_threshold=self.sv_threshold,
            rank_budget=self.rank_budget,
        )
        return {
            "rank_rule": rule,
            "ranks": ranks,
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
    sketch_precision: str

    def options(self, rank: int) -> KernelOptions:
        return KernelOptions(
            method=SvdMethod(self.svd).value,
            rank=rank,
            oversample=self.oversample,
            n_iter=parse_iterations(self.power_iterations),
            tol=self.svd_tol,
            max_iter=self.max_power_iterations,
            sketch=SketchPrecision(self.sketch_precision).value,
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
        "sketch_precision": (
            Annotated[
                SketchPrecision,
                typer.Option(
                    "--sketch-precision",
                    help="Precision of the randomized SVD's power iterations (the factors "
                    "always come from fp32 products); auto: bf16 where the CPU or GPU "
                    "multiplies it natively (AVX512-BF16, AMX, compute capability 8+), "
                    "else fp32.",
                ),
            ],
            "auto",
        ),
    },
)
