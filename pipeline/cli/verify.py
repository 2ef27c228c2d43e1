"""``loraforge verify``: its options; exit code 1 above ``--max-error``."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import JsonLog, print_error
from ..lora.config import parse_number
from ..run.options import RunOptions
from ..verify.command import verify
from ..verify.options import VerifyOptions
from .app import app, running
from .option_sets import LORAS, RUN, LoraFlags
from .options import CheckpointType, SourceModel, SourceType, TargetModel, TargetType
from .parameters import expand

VERIFY_RUN = RUN.only(
    "workers",
    "max_memory",
    "report",
    "quiet",
    "json_output",
    fixed={"device": "cpu"},
    report=(
        Annotated[
            str | None,
            typer.Option("--report", help="Write the JSON report here (default: none)."),
        ],
        None,
    ),
)


@app.command(
    "verify",
    epilog="Examples:\n\n  loraforge verify --source-model base/ --target-model ft/ "
    "--lora-model lora.safetensors\n\n  loraforge verify --source-model base/ --target-model "
    "ft/ --lora-model a.safetensors --strength 0.8 --lora-model b.safetensors --strength 1.0 "
    "--max-error 0.05 --report check.json --json",
)
@expand(LORAS, VERIFY_RUN)
def verify_command(
    source_model: SourceModel,
    target_model: TargetModel,
    lora_flags: LoraFlags = None,
    alpha: Annotated[
        str,
        typer.Option("--alpha", metavar="FLOAT", help="Global multiplier, as merge's --alpha."),
    ] = "1.0",
    max_error: Annotated[
        float | None,
        typer.Option(
            "--max-error",
            metavar="E",
            help="Exit with code 1 when the total relative error is above E.",
        ),
    ] = None,
    worst: Annotated[int, typer.Option("--worst", min=0, help="Tensors listed as the worst.")] = 10,
    source_type: SourceType = CheckpointType.safetensors,
    target_type: TargetType = CheckpointType.safetensors,
    run: RunOptions = None,
) -> None:
    """Check how closely base + LoRAs reproduce a fine-tuned checkpoint, tensor by tensor.

    Per tensor rel_error = ||B + D - F|| / ||F - B|| with D the LoRAs' delta as merge applies
    it (strength * alpha * scale * up @ down, or the diff), in fp64, a block of rows at a
    time; the total is sqrt(sum ||B + D - F||^2) / sqrt(sum ||F - B||^2). Nothing is written
    but the report (with --report).
    """
    with running("verify", run) as display:
        options = VerifyOptions(
            alpha=parse_number(alpha, "--alpha"), max_error=max_error, worst=worst
        )
        report = verify(
            source_model=source_model,
            target_model=target_model,
            loras=lora_flags.loras(),
            options=options,
            run=run,
            source_type=CheckpointType(source_type).value,
            target_type=CheckpointType(target_type).value,
            lora_type=lora_flags.file_format,
            progress=display,
        )
        display.finish(report)
    summary = report["summary"]
    if summary["passed"] is False:
        total = summary["rel_error"]
        worst_line = f"; worst {summary['worst'][0]['key']}" if summary["worst"] else ""
        print_error(
            f"total relative error {'nan' if total is None else f'{total:.6g}'} is above "
            f"--max-error {max_error:g}{worst_line}",
            1,
            JsonLog("verify") if run.json else None,
        )
        raise typer.Exit(1)
