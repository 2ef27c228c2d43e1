"""``loraforge merge``: its options, parsed into ``MergeOptions`` and ``RunOptions``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from ..console import run_command
from ..io.dtypes import parse_dtype, parse_size
from ..run.options import RunOptions
from .app import app, exit_on_failure
from .options import (
    CheckpointType,
    ConfigName,
    Device,
    Gpus,
    JsonOutput,
    LoraConfig,
    MaxMemory,
    MaxShardSize,
    MergeOutputDtype,
    OutputFormat,
    OutputPath,
    Quiet,
    ReportPath,
    Scheduler,
    SourceModel,
    SourceType,
    WorkDirOpt,
    Workers,
)


@app.command(
    epilog="Examples:\n\n  loraforge merge --source-model base/ --lora-model lora.safetensors "
    "--output merged.safetensors\n\n  loraforge merge --source-model base/ --lora-model "
    "a.safetensors --strength 0.8 --lora-model peft_adapter/ --strength 0.5 --output "
    "merged.safetensors --max-shard-size 5GB\n\n  loraforge merge --source-model "
    "base.safetensors --config loras.json --output merged.safetensors --output-dtype fp32"
    "\n\n  loraforge merge --source-model low_noise_model/ --config "
    "wan_moe_i2v_distill_with_lora.json --config-name low_noise_model --output merged.safetensors"
    "\n\n  loraforge merge --source-model base/ --lora-model lora.safetensors --output "
    "/shared/merged.safetensors --scheduler tcp://head:8786 --device cuda"
    "\n\n  loraforge merge --source-model wan_fp8_scaled.safetensors --lora-model "
    "lora.safetensors --output merged_fp8.safetensors --output-dtype fp8_e4m3fn"
)
def merge(
    source_model: SourceModel,
    output: OutputPath,
    lora_model: Annotated[
        list[str] | None,
        typer.Option(
            "--lora-model",
            metavar="PATH",
            help="LoRA: a .safetensors or .pt file, a shard directory, or a PEFT adapter "
            "directory (adapter_model.* + adapter_config.json). Repeatable.",
        ),
    ] = None,
    strength: Annotated[
        list[str] | None,
        typer.Option(
            "--strength",
            metavar="FLOAT",
            help="Strength of each --lora-model, in the same order (default 1.0). Repeatable.",
        ),
    ] = None,
    config: LoraConfig = None,
    config_name: ConfigName = None,
    alpha: Annotated[
        str,
        typer.Option(
            "--alpha",
            metavar="FLOAT",
            help="Global multiplier of every LoRA's delta (LightX2V's merge strength).",
        ),
    ] = "1.0",
    source_type: SourceType = CheckpointType.safetensors,
    lora_type: Annotated[
        CheckpointType | None,
        typer.Option("--lora-type", help="Format of the LoRA files (default: from each name)."),
    ] = None,
    output_format: OutputFormat = CheckpointType.safetensors,
    output_dtype: MergeOutputDtype = "bf16",
    max_shard_size: MaxShardSize = None,
    device: Device = "auto",
    workers: Workers = None,
    scheduler: Scheduler = None,
    report: ReportPath = None,
    work_dir: WorkDirOpt = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume", help="Keep what an interrupted run of the same merge wrote."
        ),
    ] = True,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail when any LoRA key would not be merged.")
    ] = False,
    allow_nonfinite: Annotated[
        bool,
        typer.Option("--allow-nonfinite", help="Merge LoRA tensors holding NaN/Inf anyway."),
    ] = False,
    quiet: Quiet = False,
    gpus: Gpus = None,
    max_memory: MaxMemory = None,
    json_output: JsonOutput = False,
) -> None:
    """Merge one or many LoRAs into a base checkpoint, tensor by tensor with bounded memory.

    Each targeted weight becomes W + strength * alpha * scale * (up @ down), or
    W + strength * alpha * diff for .diff/.diff_b/.diff_m, computed in fp32 and cast to
    --output-dtype; other float tensors are cast, non-float ones copied. scale is
    alpha_key / rank when the LoRA has a NAME.alpha key (as LightX2V's loader, kohya and
    ComfyUI apply it), lora_alpha / r from a PEFT adapter_config.json, else 1.

    A scaled-fp8 base (ComfyUI's scaled_fp8 or _quantization_metadata files, LightX2V's
    fp8) is read as W_fp8 * scale. --output-dtype fp8_e4m3fn writes scaled fp8 in the base's
    convention (ComfyUI's scaled_fp8 for a base without scales): each quantized weight gets
    an fp32 scale amax/448 and is rounded to nearest, saturating; other tensors keep their
    dtype. Any other --output-dtype drops the base's scales and markers.

    Differences from LightX2V's lora_merger.py: it ignores .alpha keys, so a LoRA whose alpha
    differs from its rank merges alpha/rank times stronger or weaker there (loraforge's own
    extractions store alpha = rank: identical results); it reads only lora_up/lora_down and
    diff keys, while loraforge reads every common naming and lists each key it cannot merge;
    it holds the whole model in fp32 in RAM, loraforge one tensor per worker.

    An interrupted merge keeps the temporary output beside --output; rerunning the same
    command writes only the missing tensors and gives the same bytes.
    """
    from ..lora.config import loras_from_arguments, parse_number
    from ..merge.command import merge as run_merge
    from ..merge.options import MergeOptions

    run = RunOptions(
        device=device,
        workers=workers,
        scheduler=scheduler,
        gpus=gpus,
        work_dir=work_dir,
        resume=resume,
        report=report,
        json=json_output,
        quiet=quiet,
        max_memory=max_memory,
    )

    def body(progress: Callable) -> dict:
        loras = loras_from_arguments(config, config_name, lora_model, strength)
        parse_dtype(output_dtype, fp8=True)
        options = MergeOptions(
            alpha=parse_number(alpha, "--alpha"),
            output_dtype=output_dtype.lower(),
            output_format=output_format.value,
            max_shard_size=parse_size(max_shard_size),
            strict=strict,
            allow_nonfinite=allow_nonfinite,
        )
        return run_merge(
            source_model=source_model,
            loras=loras,
            output=output,
            options=options,
            run=run,
            source_type=source_type.value,
            lora_type=lora_type.value if lora_type else None,
            progress=progress,
        )

    exit_on_failure(lambda: run_command("merge", run, body))
