"""``loraforge verify``: its options; exit code 1 above ``--max-error``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from ..console import JsonLog, print_error, run_command
from ..run.options import RunOptions
from .app import app, exit_on_failure
from .options import (
    CheckpointType,
    ConfigName,
    JsonOutput,
    LoraConfig,
    LoraModels,
    MaxMemory,
    Quiet,
    SourceModel,
    SourceType,
    Strengths,
    Workers,
)


@app.command(
    epilog="Examples:\n\n  loraforge verify --source-model base/ --target-model ft/ "
    "--lora-model lora.safetensors\n\n  loraforge verify --source-model base/ --target-model "
    "ft/ --lora-model a.safetensors --strength 0.8 --lora-model b.safetensors --strength 1.0 "
    "--max-error 0.05 --report check.json --json"
)
def verify(
    source_model: SourceModel,
    target_model: Annotated[str, typer.Option("--target-model", help="Fine-tuned checkpoint.")],
    lora_model: LoraModels = None,
    strength: Strengths = None,
    config: LoraConfig = None,
    config_name: ConfigName = None,
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
    target_type: Annotated[
        CheckpointType, typer.Option("--target-type")
    ] = CheckpointType.safetensors,
    lora_type: Annotated[
        CheckpointType | None,
        typer.Option("--lora-type", help="Format of the LoRA files (default: from each name)."),
    ] = None,
    workers: Workers = None,
    report: Annotated[
        str | None, typer.Option("--report", help="Write the JSON report here (default: none).")
    ] = None,
    quiet: Quiet = False,
    max_memory: MaxMemory = None,
    json_output: JsonOutput = False,
) -> None:
    """Check how closely base + LoRAs reproduce a fine-tuned checkpoint, tensor by tensor.

    Per tensor rel_error = ||B + D - F|| / ||F - B|| with D the LoRAs' delta as merge applies
    it (strength * alpha * scale * up @ down, or the diff), in fp64, a block of rows at a
    time; the total is sqrt(sum ||B + D - F||^2) / sqrt(sum ||F - B||^2). Nothing is written
    but the report (with --report).
    """
    from ..lora.config import loras_from_arguments, parse_number
    from ..verify.command import verify as run_verify
    from ..verify.options import VerifyOptions

    run = RunOptions(
        device="cpu",
        workers=workers,
        report=report,
        json=json_output,
        quiet=quiet,
        max_memory=max_memory,
    )
    done: dict = {}

    def body(progress: Callable) -> dict:
        options = VerifyOptions(
            alpha=parse_number(alpha, "--alpha"), max_error=max_error, worst=worst
        )
        loras = loras_from_arguments(config, config_name, lora_model, strength)
        done["report"] = run_verify(
            source_model=source_model,
            target_model=target_model,
            loras=loras,
            options=options,
            run=run,
            source_type=source_type.value,
            target_type=target_type.value,
            lora_type=lora_type.value if lora_type else None,
            progress=progress,
        )
        return done["report"]

    exit_on_failure(lambda: run_command("verify", run, body))
    summary = done["report"]["summary"]
    if summary["passed"] is False:
        total = summary["rel_error"]
        worst_line = f"; worst {summary['worst'][0]['key']}" if summary["worst"] else ""
        print_error(
            f"total relative error {'nan' if total is None else f'{total:.6g}'} is above "
            f"--max-error {max_error:g}{worst_line}",
            1,
            JsonLog("verify") if json_output else None,
        )
        raise typer.Exit(1)
