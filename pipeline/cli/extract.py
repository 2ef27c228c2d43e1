"""``loraforge extract``: its options, parsed into ``ExtractOptions`` and ``RunOptions``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from loraforge.kernels.svd import DEFAULT_MAX_ITER, DEFAULT_TOL

from ..console import run_command
from ..io.dtypes import parse_dtype, parse_size
from ..lora.styles import DEFAULT_STYLE
from ..run.options import RunOptions
from .app import app, exit_on_failure
from .options import (
    SVD_HELP,
    CheckpointType,
    Device,
    Energy,
    Gpus,
    JsonOutput,
    KeepWork,
    KeyStyleName,
    KeyStyleOpt,
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
    Scheduler,
    SourceModel,
    SourceType,
    SvdMethod,
    SvRatio,
    SvThreshold,
    WorkDirOpt,
    Workers,
)


@app.command(
    epilog="Examples:\n\n  loraforge extract --source-model base/ --target-model ft/ "
    "--output lora.safetensors --rank 32\n\n  loraforge extract --source-model "
    "base.safetensors --target-model ft.safetensors --output diff.safetensors "
    "--diff-only --output-dtype fp32\n\n  loraforge extract --source-model base/ --target-model "
    "ft/ --output lora.safetensors --gpus all\n\n  loraforge extract --source-model base/ "
    "--target-model ft/ --output lora.safetensors --scheduler /shared/scheduler.json --json"
)
def extract(
    source_model: SourceModel,
    target_model: Annotated[str, typer.Option("--target-model", help="Fine-tuned checkpoint.")],
    output: OutputPath,
    source_type: SourceType = CheckpointType.safetensors,
    target_type: Annotated[
        CheckpointType, typer.Option("--target-type")
    ] = CheckpointType.safetensors,
    output_format: OutputFormat = CheckpointType.safetensors,
    rank: Annotated[
        str,
        typer.Option(
            "--rank",
            metavar="R|R1,R2,...",
            help="LoRA rank: the factorisation rank and every rank mode's cap. Several "
            "(16,32,64): one factorisation at the largest, one file per rank, "
            "OUTPUT-STEM-r16.safetensors, ...",
        ),
    ] = "32",
    rank_mode: RankMode = RankModeName.fixed,
    min_rank: MinRank = 1,
    energy: Energy = None,
    sv_ratio: SvRatio = None,
    sv_threshold: SvThreshold = None,
    rank_budget: RankBudget = None,
    output_dtype: OutputDtype = "bf16",
    diff_only: Annotated[
        bool,
        typer.Option("--diff-only", help="Store every tensor as a full diff, no decomposition."),
    ] = False,
    lowrank_min_params: Annotated[
        int, typer.Option("--lowrank-min-params", help="Smaller tensors are stored as diffs.")
    ] = 1_000_000,
    svd: Annotated[SvdMethod, typer.Option("--svd", help=SVD_HELP)] = "randomized",
    oversample: Annotated[int, typer.Option("--oversample")] = 16,
    power_iterations: Annotated[
        str,
        typer.Option(
            "--power-iterations",
            metavar="auto|N",
            help="auto: iterate until the captured energy settles (--svd-tol, at most "
            "--max-power-iterations); N: exactly N.",
        ),
    ] = "auto",
    svd_tol: Annotated[
        float,
        typer.Option("--svd-tol", help="auto iterations stop when one gains < this of the rest."),
    ] = DEFAULT_TOL,
    max_power_iterations: Annotated[
        int, typer.Option("--max-power-iterations", help="Cap of auto power iterations.")
    ] = DEFAULT_MAX_ITER,
    device: Device = "auto",
    workers: Workers = None,
    scheduler: Scheduler = None,
    max_shard_size: MaxShardSize = None,
    report: ReportPath = None,
    work_dir: WorkDirOpt = None,
    resume: Resume = True,
    keep_work: KeepWork = True,
    quiet: Quiet = False,
    gpus: Gpus = None,
    max_memory: MaxMemory = None,
    json_output: JsonOutput = False,
    key_style: KeyStyleOpt = DEFAULT_STYLE,
) -> None:
    """Extract a LoRA from the difference between a base and a fine-tuned checkpoint."""
    from ..export.ranks import parse_iterations, parse_ranks, rank_rule
    from ..extract.command import extract as run_extract
    from ..extract.options import ExtractOptions, KernelOptions

    run = RunOptions(
        device=device,
        workers=workers,
        scheduler=scheduler,
        gpus=gpus,
        work_dir=work_dir,
        resume=resume,
        keep_work=keep_work,
        report=report,
        json=json_output,
        quiet=quiet,
        max_memory=max_memory,
    )

    def body(progress: Callable) -> dict:
        parse_dtype(output_dtype)
        ranks = parse_ranks(rank)
        options = ExtractOptions(
            kernel=KernelOptions(
                method=SvdMethod(svd).value,
                rank=ranks[-1],
                oversample=oversample,
                n_iter=parse_iterations(power_iterations),
                tol=svd_tol,
                max_iter=max_power_iterations,
            ),
            rank_rule=rank_rule(
                mode=RankModeName(rank_mode).value,
                rank=ranks[-1],
                min_rank=min_rank,
                energy=energy,
                sv_ratio=sv_ratio,
                sv_threshold=sv_threshold,
                rank_budget=rank_budget,
            ),
            ranks=ranks,
            lowrank_min_params=lowrank_min_params,
            diff_only=diff_only,
            output_dtype=output_dtype.lower(),
            output_format=output_format.value,
            max_shard_size=parse_size(max_shard_size),
            key_style=KeyStyleName(key_style).value,
        )
        return run_extract(
            source_model=source_model,
            target_model=target_model,
            output=output,
            options=options,
            run=run,
            source_type=source_type.value,
            target_type=target_type.value,
            progress=progress,
        )

    exit_on_failure(lambda: run_command("extract", run, body))
