"""The work directory a run keeps its intermediates, markers, manifest and lock in."""

from .lock import RunLock
from .store import CorruptEntry, WorkDir

__all__ = ["CorruptEntry", "RunLock", "WorkDir"]
