"""The typer app every command registers on: click's usage errors as one line, the
entry point."""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from typer.core import TyperGroup

from ..console import Bar, Failed, JsonLog, command_output, print_error
from ..run.options import RunOptions

# typer vendors click in recent releases (typer._click) and uses click itself in older ones: find
# click's exception classes through typer's public ones instead of importing either.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_NO_ARGS_HELP = getattr(
    sys.modules[_CLICK_ERROR.__module__], "NoArgsIsHelpError", type("NeverRaised", (Exception,), {})
)


class _OneLineErrors(TyperGroup):
    """Bad option values (click's usage errors: ``--rank x``, ``--svd qr``) end like every other
    error: one ``error:`` line (and a JSON ``error`` event with ``--json``), exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        try:
            code = super().main(argv, prog_name, complete_var, False, **extra)
        except _NO_ARGS_HELP:
            return super().main(argv, prog_name, complete_var, True, **extra)  # help, as before
        except _CLICK_ERROR as e:
            command = e.ctx.command_path if getattr(e, "ctx", None) else "loraforge"
            message = f"{e.format_message()} (see {command} --help)"
            log = JsonLog(argv[0]) if argv and "--json" in argv else None
            print_error(message, e.exit_code, log)
            sys.exit(e.exit_code)
        except typer.Abort:
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings wrap as paragraphs, not at their line breaks
    help="Extract, merge and convert LoRAs for checkpoints larger than RAM.",
)


@contextmanager
def exit_on_failure() -> Iterator[None]:
    """An error already printed as its one line (``Failed``) ends the command with its code."""
    try:
        yield
    except Failed as failed:
        raise typer.Exit(failed.exit_code) from None


@contextmanager
def running(command: str, run: RunOptions) -> Iterator[Bar | JsonLog]:
    """A command's run under the console (``console.command_output``): yields the progress
    callback to hand to the command, and its ``finish`` for the report."""
    with exit_on_failure(), command_output(command, run) as display:
        yield display


def main() -> None:
    """The console script. A finished command leaves the interpreter without its teardown:
    the exit handlers run and the streams are flushed, then ``os._exit``. Every output is
    published (renamed, fsynced) before the command returns, so nothing is left to do but
    free memory, and with torch loaded that teardown took 0.45 s of every command here (of a
    14 s extraction). Anything but ``SystemExit`` (an interrupt, a bug) exits the normal way.
    The objects made by the imports are frozen first: no collection sweeps them again."""
    gc.freeze()
    try:
        app(prog_name="loraforge")
        code = 0
    except SystemExit as finished:
        code = finished.code
    _exit_now(code)


def _exit_now(code: int | str | None) -> NoReturn:
    if not isinstance(code, int):  # SystemExit's other forms: None is success, text an error
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    atexit._run_exitfuncs()  # logging's flush, weakref finalizers (temporary directories)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the reader is gone, nothing to flush to
            code = code or 1
    os._exit(code)
