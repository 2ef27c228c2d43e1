"""Checks on the paths a user gives, made before any work starts."""

from __future__ import annotations

import os
from collections.abc import Iterable

from ..errors import OutputError, UsageError


def check_output_location(output: str) -> None:
    """Fail before any work if the output cannot be written."""
    if os.path.isdir(output):
        raise OutputError("is a directory", path=output, hint="give a file name for --output")
    directory = os.path.dirname(output)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot create the output directory ({e.strerror})",
            path=directory,
            hint="choose a writable --output location",
        ) from None
    if not os.access(directory, os.W_OK):
        raise OutputError(
            "output directory is not writable",
            path=directory,
            hint="choose a writable --output location",
        )


def check_not_an_input(outputs: Iterable[str], inputs: Iterable[str]) -> None:
    """Refuse any output file that is one of the input files (through links, too)."""
    read = {os.path.realpath(file) for file in inputs}
    for file in outputs:
        if os.path.realpath(file) in read:
            raise UsageError(
                "the output would overwrite an input", path=file, hint="choose another --output"
            )
