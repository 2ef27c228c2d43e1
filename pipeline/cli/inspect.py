"""``loraforge inspect``: its arguments, the report on stdout (tables or ``--json``)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from ..console import JsonLog, json_line, user_errors
from ..inspect.command import inspect_lora
from ..inspect.display import print_inspect
from .app import app, exit_on_failure
from .options import CheckpointType


@app.command(
    "inspect",
    epilog="Examples:\n\n  loraforge inspect lora.safetensors\n\n  loraforge inspect "
    "peft_adapter/ --base base/ --json",
)
def inspect_command(
    path: Annotated[
        str,
        typer.Argument(
            metavar="PATH",
            help="LoRA: a .safetensors or .pt file, a shard directory, or a PEFT adapter "
            "directory.",
        ),
    ],
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            metavar="MODEL",
            help="Base checkpoint: also list the base tensors it patches, its keys that patch "
            "nothing and its shape mismatches (headers only).",
        ),
    ] = None,
    lora_type: Annotated[
        CheckpointType | None,
        typer.Option("--lora-type", help="Format of the LoRA (default: from its name)."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="The report as one JSON object on stdout.")
    ] = False,
) -> None:
    """Show what a LoRA holds, writing nothing: the naming detected, tensors, dtypes and bytes,
    the ranks, alphas and effective scales (alpha / rank, PEFT's lora_alpha / r, else 1), and
    each delta's Frobenius norm with its scale (low-rank ones from their factors, to about
    1e-6 relative, without forming the product). Modules are named as in the LoRA's own keys;
    with --base, also the base tensors they patch."""
    with exit_on_failure(), user_errors(JsonLog("inspect") if json_output else None, "inspect"):
        report = inspect_lora(path, base, lora_type.value if lora_type else None)
        if json_output:
            sys.stdout.write(json_line(report) + "\n")
        else:
            print_inspect(report)
