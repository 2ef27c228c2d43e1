"""``loraforge clean``: remove a work directory that no live run holds."""

from __future__ import annotations

import os

from ..errors import UsageError
from .lock import RunLock
from .store import WorkDir


def clean_work_dir(path: str) -> tuple[str, int]:
    """Remove what loraforge wrote in the work directory ``path`` (then the directory, when
    nothing else is left); return its absolute path and the bytes it held."""
    work = WorkDir(path)
    if not os.path.isdir(work.path) or not os.path.isdir(work.done):
        raise UsageError("not a loraforge work directory", path=work.path)
    lock = RunLock(work.path)
    lock.acquire()  # refuses while a live run holds it
    try:
        size = work.size_bytes()
        work.clear()
    finally:
        lock.release()
    work.remove()
    return work.path, size
