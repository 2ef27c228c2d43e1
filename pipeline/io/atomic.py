"""Write-to-temporary-then-rename helpers, so nothing that looks finished is ever half-written."""

from __future__ import annotations

import json
import math
import os


def temporary_name(path: str) -> str:
    """A hidden sibling; the work-directory lock keeps two runs from sharing it."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.partial")


def temporary_of(name: str) -> str | None:
    """The file name whose temporary (``temporary_name``) is called ``name``; None for a name
    that is not a temporary's."""
    if name.startswith(".") and name.endswith(".partial"):
        return name[1 : -len(".partial")]
    return None


def make_parent(path: str) -> None:
    """Create ``path``'s directory if needed: outputs may go to a directory that does not exist
    yet (the checks before a run only make sure it can be created)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)


def write_text(path: str, text: str) -> None:
    """``text`` at ``path``, which holds either its old contents or all of ``text``."""
    make_parent(path)
    tmp = temporary_name(path)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def strict_json(data: object) -> object:
    """``data`` with every NaN or infinite float replaced by None, so that it serialises as
    strict JSON (null), which every JSON reader takes, instead of Python's bare ``NaN``."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def json_text(data: object) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def write_json(path: str, data: object) -> None:
    """``data`` as indented JSON with sorted keys, atomically (``write_text``)."""
    write_text(path, json_text(data))


def write_json_to(path: str, data: object) -> None:
    """``data`` as ``write_json`` formats it, straight into ``path`` (itself a temporary)."""
    make_parent(path)
    with open(path, "w") as f:
        f.write(json_text(data))


def remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
