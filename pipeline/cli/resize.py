"""``loraforge resize``: its options, parsed into ``ResizeOptions`` and ``RunOptions``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from ..console import run_command
from ..errors import UsageError
from ..io.dtypes import parse_dtype, parse_size
from ..lora.styles import DEFAULT_STYLE
from ..run.options import RunOptions
from .app import app, exit_on_failure
from .options import (
    CheckpointType,
    ConfigName,
    Energy,
    JsonOutput,
    KeepWork,
    KeyStyleName,
    KeyStyleOpt,
    LoraConfig,
    LoraModels,
    MaxMemory,
    MaxShardSize,
    MinRank,
    OutputDtype,
    OutputFormat,
    OutputPath,
    Quiet,
    RankBudget,
    RankMode,
    RankModeName,
    ReportPath,
    Resume,
    Strengths,
    SvRatio,
    SvThreshold,
    WorkDirOpt,
    Workers,
)


@app.command(
    epilog="Examples:\n\n  loraforge resize --lora-model big.safetensors --output "
    "small.safetensors --rank 16\n\n  loraforge resize --lora-model a.safetensors "
    "--strength 0.8 --lora-model peft_adapter/ --strength 0.5 --output ab.safetensors "
    "--rank 64 --rank-mode energy --energy 0.99\n\n  loraforge resize --lora-model "
    "kohya.safetensors --base base/ --output lora.safetensors --rank 32 --rank-mode budget "
    "--rank-budget 20000000"
)
def resize(
    output: OutputPath,
    rank: Annotated[
        str,
        typer.Option(
            "--rank",
            metavar="R|R1,R2,...",
            help="Largest rank kept per tensor (every --rank-mode's cap). Several (16,32): "
            "one file per rank, OUTPUT-STEM-r16.safetensors, ...",
        ),
    ],
    lora_model: LoraModels = None,
    strength: Strengths = None,
    config: LoraConfig = None,
    config_name: ConfigName = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base checkpoint whose tensor names the LoRAs are mapped onto (needed for "
            "kohya names); only its headers are read.",
        ),
    ] = None,
    base_type: Annotated[CheckpointType, typer.Option("--base-type")] = CheckpointType.safetensors,
    lora_type: Annotated[
        CheckpointType | None,
        typer.Option("--lora-type", help="Format of the LoRA files (default: from each name)."),
    ] = None,
    rank_mode: RankMode = RankModeName.fixed,
    min_rank: MinRank = 1,
    energy: Energy = None,
    sv_ratio: SvRatio = None,
    sv_threshold: SvThreshold = None,
    rank_budget: RankBudget = None,
    output_format: OutputFormat = CheckpointType.safetensors,
    output_dtype: OutputDtype = "bf16",
    max_shard_size: MaxShardSize = None,
    key_style: KeyStyleOpt = DEFAULT_STYLE,
    workers: Workers = None,
    report: ReportPath = None,
    work_dir: WorkDirOpt = None,
    resume: Resume = True,
    keep_work: KeepWork = True,
    allow_nonfinite: Annotated[
        bool,
        typer.Option("--allow-nonfinite", help="Read LoRA tensors holding NaN/Inf anyway."),
    ] = False,
    quiet: Quiet = False,
    max_memory: MaxMemory = None,
    json_output: JsonOutput = False,
) -> None:
    """Resize one LoRA, or sum several into one, at chosen ranks.

    Per target weight the exact sum of strength * scale * up @ down over the LoRAs is
    refactored without forming the dense product (QR of the stacked factors, SVD of the small
    core), then each tensor keeps the rank --rank-mode chooses (at most --rank) with
    alpha = rank. Full diffs (diff, diff_b, diff_m) are summed. The report gives each tensor's
    error against the exact sum. Another --rank, --rank-mode or output option with the same
    --work-dir re-exports without recomputing.
    """
    from ..export.ranks import parse_ranks, rank_rule
    from ..lora.config import loras_from_arguments
    from ..resize.command import resize as run_resize
    from ..resize.options import ResizeOptions

    run = RunOptions(
        device="cpu",
        workers=workers,
        work_dir=work_dir,
        resume=resume,
        keep_work=keep_work,
        report=report,
        json=json_output,
        quiet=quiet,
        max_memory=max_memory,
    )

    def body(progress: Callable) -> dict:
        if config and (lora_model or strength):
            raise UsageError("give the LoRAs with --config or with --lora-model, not both")
        parse_dtype(output_dtype)
        ranks = parse_ranks(rank)
        options = ResizeOptions(
            rank_rule=rank_rule(
                mode=RankModeName(rank_mode).value,
                rank=ranks[-1],
                min_rank=min_rank,
                energy=energy,
                sv_ratio=sv_ratio,
                sv_threshold=sv_threshold,
                rank_budget=rank_budget,
            ),
            output_dtype=output_dtype.lower(),
            ranks=ranks,
            output_format=output_format.value,
            max_shard_size=parse_size(max_shard_size),
            key_style=KeyStyleName(key_style).value,
            allow_nonfinite=allow_nonfinite,
        )
        loras = loras_from_arguments(config, config_name, lora_model, strength)
        return run_resize(
            loras=loras,
            output=output,
            options=options,
            base=base,
            base_type=base_type.value,
            lora_type=lora_type.value if lora_type else None,
            run=run,
            progress=progress,
        )

    exit_on_failure(lambda: run_command("resize", run, body))
