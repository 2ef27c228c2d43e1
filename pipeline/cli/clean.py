"""``loraforge clean``: remove a work directory."""

from __future__ import annotations

from typing import Annotated

import typer

from ..console import print_cleaned, user_errors
from ..workdir.clean import clean_work_dir
from .app import app, exit_on_failure


@app.command("clean", epilog="Example:\n\n  loraforge clean lora.safetensors.work")
def clean_command(
    work_dir: Annotated[str, typer.Argument(help="Work directory to remove.")],
) -> None:
    """Remove a work directory (intermediates kept for resume): what loraforge wrote there,
    the temporary output its run left beside --output to resume from, then the directory itself
    when nothing else is left in it. A symlink to a work directory is followed."""
    with exit_on_failure(), user_errors(command="clean"):
        print_cleaned(clean_work_dir(work_dir))
