"""``loraforge convert``: its arguments and options."""

from __future__ import annotations

from typing import Annotated

import typer

from ..convert.command import convert
from ..io.dtypes import parse_size
from ..lora.styles import KEY_STYLE_HELP
from ..run.options import RunOptions
from .app import app, running
from .option_sets import RUN
from .options import CheckpointType, KeyStyleName, MaxShardSize
from .parameters import expand


@app.command(
    "convert",
    epilog="Examples:\n\n  loraforge convert lora.safetensors lora_peft --to peft\n\n  "
    "loraforge convert kohya_lora.safetensors lora.safetensors --to lightx2v --base base/\n\n  "
    "loraforge convert peft_adapter/ lora_diffusers.safetensors --to diffusers",
)
@expand(RUN.only("report", "quiet", "json_output"))
def convert_command(
    lora: Annotated[
        str,
        typer.Argument(
            metavar="IN", help="LoRA: a file, a shard directory or a PEFT adapter directory."
        ),
    ],
    output: Annotated[
        str,
        typer.Argument(
            metavar="OUT", help="Output file (a directory for --to peft); .safetensors is added."
        ),
    ],
    to: Annotated[KeyStyleName, typer.Option("--to", help=KEY_STYLE_HELP)],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            metavar="MODEL",
            help="The model the LoRA patches: names are taken from its keys (needed for kohya "
            "lora_unet_ names).",
        ),
    ] = None,
    base_type: Annotated[CheckpointType, typer.Option("--base-type")] = CheckpointType.safetensors,
    lora_type: Annotated[
        CheckpointType | None,
        typer.Option("--lora-type", help="Format of IN (default: from its name)."),
    ] = None,
    max_shard_size: MaxShardSize = None,
    run: RunOptions = None,
) -> None:
    """Rewrite a LoRA in another key style, tensor by tensor: factors and diffs keep their
    dtype and bytes, alpha / rank keeps its value, so merging the result gives the same bytes
    as merging IN. What the target style cannot hold (full diffs in peft and diffusers) is
    listed in the summary and the report."""
    with running("convert", run) as display:
        report = convert(
            lora=lora,
            output=output,
            to=KeyStyleName(to).value,
            base=base,
            lora_type=lora_type.value if lora_type else None,
            base_type=CheckpointType(base_type).value,
            max_shard_size=parse_size(max_shard_size),
            run=run,
            progress=display,
        )
        display.finish(report)
