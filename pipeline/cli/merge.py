"""``loraforge merge``: its options, parsed into ``MergeOptions`` and ``RunOptions``."""

from __future__ import annotations

from typing import Annotated

import typer

from ..io.dtypes import parse_dtype, parse_size
from ..lora.config import parse_number
from ..merge.command import merge
from ..merge.options import MergeOptions
from ..run.options import RunOptions
from .app import app, running
from .option_sets import LORAS, RUN, LoraFlags
from .options import (
    AllowNonfinite,
    CheckpointType,
    MaxShardSize,
    MergeOutputDtype,
    OutputFormat,
    OutputPath,
    SourceModel,
    SourceType,
)
from .parameters import expand

MERGE_RUN = RUN.only(
    "device",
    "workers",
    "scheduler",
    "gpus",
    "max_memory",
    "work_dir",
    "resume",
    "report",
    "quiet",
    "json_output",
    resume=(
        Annotated[
            bool,
            typer.Option(
                "--resume/--no-resume",
                help="Keep what an interrupted run of the same merge wrote.",
            ),
        ],
        True,
    ),
)


@app.command(
    "merge",
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
    "lora.safetensors --output merged_fp8.safetensors --output-dtype fp8_e4m3fn",
)
@expand(LORAS, MERGE_RUN)
def merge_command(
    source_model: SourceModel,
    output: OutputPath,
    lora_flags: LoraFlags = None,
    alpha: Annotated[
        str,
        typer.Option(
            "--alpha",
            metavar="FLOAT",
            help="Global multiplier of every LoRA's delta (LightX2V's merge strength).",
        ),
    ] = "1.0",
    source_type: SourceType = CheckpointType.safetensors,
    output_format: OutputFormat = CheckpointType.safetensors,
    output_dtype: MergeOutputDtype = "bf16",
    max_shard_size: MaxShardSize = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail when any LoRA key would not be merged.")
    ] = False,
    allow_nonfinite: AllowNonfinite = False,
    run: RunOptions = None,
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
    with running("merge", run) as display:
        loras = lora_flags.loras()
        parse_dtype(output_dtype, fp8=True)
        options = MergeOptions(
            alpha=parse_number(alpha, "--alpha"),
            output_dtype=output_dtype.lower(),
            output_format=CheckpointType(output_format).value,
            max_shard_size=parse_size(max_shard_size),
            strict=strict,
            allow_nonfinite=allow_nonfinite,
        )
        report = merge(
            source_model=source_model,
            loras=loras,
            output=output,
            options=options,
            run=run,
            source_type=CheckpointType(source_type).value,
            lora_type=lora_flags.file_format,
            progress=display,
        )
        display.finish(report)
