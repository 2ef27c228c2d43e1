"""The ``loraforge`` command line: typer options in, one call into a command's package, the
console (``console.py``) for everything shown. No logic of its own beyond parsing options.

One module per command, registered on the one ``app`` (``app.py``) when imported here; the
option types several commands share are in ``options.py``."""

import gc

# Importing torch and the commands makes about a million objects; the collector sweeping them
# while they are made cost 0.15-0.4 s of every command's start-up here. Paused for the imports;
# a command run from the console script freezes them out of later collections (``app.main``).
_collecting = gc.isenabled()
gc.disable()
try:
    from .app import app, main

    # isort: off
    # Imported for their registration on ``app``, in the order --help lists the commands.
    from . import extract, merge, inspect, resize, convert, verify, clean, infer, serve  # noqa: F401

    # isort: on
finally:
    if _collecting:
        gc.enable()

__all__ = ["app", "main"]
