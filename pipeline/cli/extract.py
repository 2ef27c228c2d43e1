"""``loraforge extract``: its options, parsed into ``ExtractOptions`` and ``RunOptions``."""

from __future__ import annotations

from typing import Annotated

import typer

from ..extract.command import extract
from ..extract.options import ExtractOptions
from ..run.options import RunOptions
from .app import app, running
from .option_sets import KERNEL, LORA_OUTPUT, RUN, KernelFlags, LoraOutputFlags
from .options import CheckpointType, OutputPath, SourceModel, SourceType, TargetModel, TargetType
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
@expand(LORA_OUTPUT, KERNEL, RUN)
def extract_command(
    source_model: SourceModel,
    target_model: TargetModel,
    output: OutputPath,
    source_type: SourceType = CheckpointType.safetensors,
    target_type: TargetType = CheckpointType.safetensors,
    output_flags: LoraOutputFlags = None,
    diff_only: Annotated[
        bool,
        typer.Option("--diff-only", help="Store every tensor as a full diff, no decomposition."),
    ] = False,
    lowrank_min_params: Annotated[
        int, typer.Option("--lowrank-min-params", help="Smaller tensors are stored as diffs.")
    ] = 1_000_000,
    kernel_flags: KernelFlags = None,
    run: RunOptions = None,
) -> None:
    """Extract a LoRA from the difference between a base and a fine-tuned checkpoint."""
    with running("extract", run) as display:
        output_fields = output_flags.fields()
        options = ExtractOptions(
            kernel=kernel_flags.options(output_fields["ranks"][-1]),
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
