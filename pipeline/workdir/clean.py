"""``loraforge clean``: remove a work directory that no live run holds, and the temporary output
its run left to resume from."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UsageError
from ..io.atomic import remove_quietly, temporary_name
from ..io.layout import output_candidates, shard_pattern
from .lock import RunLock
from .store import WorkDir


@dataclass(frozen=True)
class Cleaned:
    path: str  # the work directory (a symlink given is followed)
    size: int  # bytes it held
    temporaries: list[str]  # temporary output files removed beside the run's output


def leftover_temporaries(manifest: dict | None) -> list[str]:
    """The temporary output files (``.<name>.partial``) the run of ``manifest`` may have left
    beside its output: the file, its index and its shards."""
    output = (manifest or {}).get("output")
    if not output:
        return []
    directory = os.path.dirname(output)
    candidates = output_candidates(output)
    try:  # shards that were never renamed exist only under their temporary names
        names = os.listdir(directory)
    except OSError:
        names = []
    pattern = shard_pattern(output)
    for name in sorted(names):
        if name.startswith(".") and name.endswith(".partial") and pattern.fullmatch(name[1:-8]):
            candidates.append(os.path.join(directory, name[1:-8]))
    found = {temporary_name(c) for c in candidates}
    return sorted(t for t in found if os.path.isfile(t))


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
        work.clear()
    finally:
        lock.release()
    work.remove()
    return Cleaned(work.path, size, temporaries)
