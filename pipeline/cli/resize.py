"""``loraforge resize``: its options, parsed into ``ResizeOptions`` and ``RunOptions``."""

from __future__ import annotations

from typing import Annotated

import typer

from ..resize.command import resize
from ..resize.options import ResizeOptions
from ..run.options import RunOptions
from .app import app, running
from .option_sets import LORA_OUTPUT, LORAS, RUN, LoraFlags, LoraOutputFlags
from .options import AllowNonfinite, CheckpointType, OutputPath
from .parameters import expand

RESIZE_RANK = Annotated[
    str,
    typer.Option(
        "--rank",
        metavar="R|R1,R2,...",
        help="Largest rank kept per tensor (every --rank-mode's cap). Several (16,32): "
        "one file per rank, OUTPUT-STEM-r16.safetensors, ...",
    ),
]
RESIZE_OUTPUT = LORA_OUTPUT.only(*LORA_OUTPUT.options, rank=(RESIZE_RANK, ...))
RESIZE_RUN = RUN.only(
    "workers",
    "max_memory",
    "work_dir",
    "resume",
    "keep_work",
    "report",
    "quiet",
    "json_output",
    fixed={"device": "cpu"},  # the refactoring is small dense algebra: CPU only
)


@app.command(
    "resize",
    epilog="Examples:\n\n  loraforge resize --lora-model big.safetensors --output "
    "small.safetensors --rank 16\n\n  loraforge resize --lora-model a.safetensors "
    "--strength 0.8 --lora-model peft_adapter/ --strength 0.5 --output ab.safetensors "
    "--rank 64 --rank-mode energy --energy 0.99\n\n  loraforge resize --lora-model "
    "kohya.safetensors --base base/ --output lora.safetensors --rank 32 --rank-mode budget "
    "--rank-budget 20000000",
)
@expand(LORAS, RESIZE_OUTPUT, RESIZE_RUN)
def resize_command(
    output: OutputPath,
    lora_flags: LoraFlags = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="Base checkpoint whose tensor names the LoRAs are mapped onto (needed for "
            "kohya names); only its headers are read.",
        ),
    ] = None,
    base_type: Annotated[CheckpointType, typer.Option("--base-type")] = CheckpointType.safetensors,
    output_flags: LoraOutputFlags = None,
    allow_nonfinite: AllowNonfinite = False,
    run: RunOptions = None,
) -> None:
    """Resize one LoRA, or sum several into one, at chosen ranks.

    Per target weight the exact sum of strength * scale * up @ down over the LoRAs is
    refactored without forming the dense product (QR of the stacked factors, SVD of the small
    core), then each tensor keeps the rank --rank-mode chooses (at most --rank) with
    alpha = rank. Full diffs (diff, diff_b, diff_m) are summed. The report gives each tensor's
    error against the exact sum. Another --rank, --rank-mode or output option with the same
    --work-dir re-exports without recomputing.
    """
    with running("resize", run) as display:
        options = ResizeOptions(allow_nonfinite=allow_nonfinite, **output_flags.fields())
        report = resize(
            loras=lora_flags.loras(),
            output=output,
            options=options,
            base=base,
            base_type=CheckpointType(base_type).value,
            lora_type=lora_flags.file_format,
            run=run,
            progress=display,
        )
        display.finish(report)
