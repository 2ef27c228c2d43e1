"""Write-to-temporary-then-rename helpers, so nothing that looks finished is ever half-written."""

from __future__ import annotations

import json
import os


def temporary_name(path: str) -> str:
    """A hidden sibling; the work-directory lock keeps two runs from sharing it."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.partial")


def write_json(path: str, data: object) -> None:
    tmp = temporary_name(path)
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
