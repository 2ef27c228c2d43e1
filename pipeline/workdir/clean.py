"""``loraforge clean``: remove a work directory that no live run holds, and the temporary output
its run left to resume from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import UsageError
from ..io.atomic import remove_quietly, temporary_of
from ..io.layout import index_file_name, shard_pattern
from .lock import RunLock
from .store import WorkDir


@dataclass(frozen=True)
class Cleaned:
    path: str  # the work directory (a symlink given is followed)
    size: int  # bytes removed
    temporaries: list[str]  # temporary output files removed beside the run's output
    kept: list[str] = field(default_factory=list)  # files not loraforge's, relative, kept


def leftover_temporaries(manifest: dict | None) -> list[str]:
    """The temporary output files (``.<name>.partial``) the run of ``manifest`` left beside
    its outputs (``--output``, and one per rank of ``--rank 16,32``): those of each file, its
    index and its shards."""
    manifest = manifest or {}
    outputs = manifest.get("outputs") or ([manifest["output"]] if manifest.get("output") else [])
    found: set[str] = set()
    for output in outputs:
        found.update(_temporaries_of(output))
    return sorted(found)


def _temporaries_of(output: str) -> list[str]:
    directory = os.path.dirname(output)
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    own = {os.path.basename(output), os.path.basename(index_file_name(output))}
    shards = shard_pattern(output)
    return [
        os.path.join(directory, name)
        for name in names
        if (plain := temporary_of(name)) is not None
        and (plain in own or shards.fullmatch(plain))
        and os.path.isfile(os.path.join(directory, name))
    ]


def clean_work_dir(path: str) -> Cleaned:
    """Remove what loraforge wrote in the work directory ``path`` (then the directory, when
    nothing else is left) and the temporary output its run left for a resume."""
    if not path.strip():
        raise UsageError(
            "the work directory argument is empty", hint="give the --work-dir of a run"
        )
    work = WorkDir(os.path.realpath(path))
    if not work.is_loraforges():
        raise UsageError(
            "not a loraforge work directory",
            path=path,
            hint="give the --work-dir of a run; the default is <output>.work",
        )
    lock = RunLock(work.path)
    lock.acquire()  # refuses while a live run holds it
    try:
        size = work.size_bytes()
        temporaries = leftover_temporaries(work.read_manifest())
        for file in temporaries:
            size += os.path.getsize(file)
            remove_quietly(file)
        kept = work.remove(lock)
    finally:
        lock.release()
    size -= work.size_bytes()
    return Cleaned(work.path, size, temporaries, kept)
