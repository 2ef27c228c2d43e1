"""A work directory's completion markers as tests read and damage them (``workdir/markers.py``
keeps them in a log per process)."""

from __future__ import annotations

import json
import os

from loraforge.pipeline.workdir import WorkDir
from loraforge.pipeline.workdir.markers import append
from loraforge.pipeline.workdir.own import is_marker_log


def stored(work_dir) -> dict[str, dict]:
    """Every finished tensor's marker, by key."""
    return WorkDir(str(work_dir)).markers()


def count(work_dir) -> int:
    return len(stored(work_dir))


def lose(work_dir, key: str) -> None:
    """Delete every line about ``key`` from the logs, as a lost marker would leave them."""
    done = os.path.join(str(work_dir), "done")
    for name in os.listdir(done):
        if not is_marker_log(name):
            continue
        path = os.path.join(done, name)
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
        kept = [line for line in lines if not _about(line, key)]
        with open(path, "wb") as f:
            f.writelines(kept)


def _about(line: bytes, key: str) -> bool:
    try:
        return json.loads(line).get("key") == key
    except ValueError:
        return False


def replace(work_dir, key: str, marker: dict) -> None:
    """``key``'s marker from now on (a later line wins)."""
    append(os.path.join(str(work_dir), "done"), key, marker)
