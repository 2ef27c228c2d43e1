"""``loraforge extract``: its options, parsed into ``ExtractOptions`` and ``RunOptions``."""

from __future__ import annotations

from typing import Annotated

import typer

from loraforge.kernels.svd import DEFAULT_MAX_ITER, DEFAULT_TOL

from ..export.ranks import parse_iterations
from ..extract.command import extract
from ..extract.options import ExtractOptions, KernelOptions
from ..run.options import RunOptions
from .app import app, running
from .options import (
    LORA_OUTPUT,
    RUN,
    SVD_HELP,
    CheckpointType,
    LoraOutputFlags,
    OutputPath,
    SourceModel,
    SourceType,
    SvdMethod,
)
from .parameters import expand


@app.command(
    "extract",
    epilog="Examples:\n\n  loraforge extract --source-model base/ --target-model ft/ "
    "--output lora.safetensors --rank 32\n\n  loraforge extract --source-model "
    "base.safetensors --target-model ft.safetensors --output diff.safetensors "
    "--diff-only --output-dtype fp32\n\n  loraforge extract --source-model base/ --target-model "
    "ft/ --output lora.safetensors --gpus all\n\n  loraforge extract --source-model base/ "
    "--target-model ft/ --output lora.safetensors --scheduler /shared/scheduler.json --json",
)
@expand(LORA_OUTPUT, RUN)
def extract_command(
    source_model: SourceModel,
    target_model: Annotated[str, typer.Option("--target-model", help="Fine-tuned checkpoint.")],
    output: OutputPath,
    source_type: SourceType = CheckpointType.safetensors,
    target_type: Annotated[
        CheckpointType, typer.Option("--target-type")
    ] = CheckpointType.safetensors,
    output_flags: LoraOutputFlags = None,
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
    run: RunOptions = None,
) -> None:
    """Extract a LoRA from the difference between a base and a fine-tuned checkpoint."""
    with running("extract", run) as display:
        output_fields = output_flags.fields()
        kernel = KernelOptions(
            method=SvdMethod(svd).value,
            rank=output_fields["ranks"][-1],
            oversample=oversample,
            n_iter=parse_iterations(power_iterations),
            tol=svd_tol,
            max_iter=max_power_iterations,
        )
        options = ExtractOptions(
            kernel=kernel,
            lowrank_min_params=lowrank_min_params,
            diff_only=diff_only,
            **output_fields,
        )
        report = extract(
            source_model=source_model,
            target_model=target_model,
            output=output,
            options=options,
            run=run,
            source_type=CheckpointType(source_type).value,
            target_type=CheckpointType(target_type).value,
            progress=display,
        )
        display.finish(report)
