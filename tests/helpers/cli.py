"""Running loraforge's CLI: in this process (fast) or as a real process (exit codes, signals,
crashes)."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from loraforge.pipeline.cli import app

CLI = [sys.executable, "-m", "loraforge.pipeline.cli"]


def run_cli(*args: str):
    """Run the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    # Wide enough that rich's help table does not abbreviate option names.
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "240"})


def run_process(*args: str, env: dict | None = None, timeout: float = 180, **kwargs):
    """Run the CLI as its own process (in its own session, so a crash point's ``killpg`` hits
    only it); returns the ``CompletedProcess`` with text output."""
    return subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        **kwargs,
    )
