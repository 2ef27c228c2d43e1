"""The ``loraforge`` command line: typer options in, one call into a command's package, the
console (``console.py``) for everything shown. No logic of its own beyond parsing options.

One module per command, registered on the one ``app`` (``app.py``) when imported here; the
option types several commands share are in ``options.py``."""

from .app import app, main

# isort: off
# Imported for their registration on ``app``, in the order --help lists the commands.
from . import extract, merge, inspect, resize, convert, verify, clean, infer, serve  # noqa: F401

# isort: on

__all__ = ["app", "main"]
