"""What loraforge writes in a work directory, by name, so that ``clean``, ``--no-keep-work``
and ``--no-resume`` delete exactly that: a file of the user's anywhere inside (in ``tensors/``
or ``done/`` too) is never deleted, and ``clean`` names it.

Inside ``tensors/`` (a zarr v3 store, ``store.py`` and ``zarr_direct.py``): ``zarr.json`` of the
root group, of each tensor's group ``<entry>/`` and of each of its arrays ``<entry>/<array>/``,
and the arrays' chunks ``<entry>/<array>/c``, ``c.<i>.<j>...`` or (older work directories)
``c/<i>/<j>/...`` (digits). Inside ``done/``:
marker logs ``markers-*.jsonl`` whose first line names a key, and markers ``<entry>.json``
whose ``key`` is that entry's (an older loraforge's). Anywhere: the temporaries
``.<name>.partial`` of those files (``io/atomic.py``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

from ..io.atomic import temporary_of

META = "zarr.json"


def entry_name(key: str) -> str:
    """A tensor key as a file name (its group in ``tensors/``, its marker in ``done/``)."""
    return quote(key, safe=".-_")


def _plain(name: str) -> str:
    """A file's name without the ``.<name>.partial`` of a temporary."""
    plain = temporary_of(name)
    return name if plain is None else plain


def is_result_file(parts: tuple[str, ...]) -> bool:
    """Whether a path under ``tensors/`` (its parts) is one loraforge writes there."""
    *dirs, name = parts
    if _plain(name) == META:
        return len(dirs) <= 2  # the root group, an entry's group, an array
    if len(dirs) == 2 and name.split(".")[0] == "c":  # c (0-d), c.0.0 (the "." separator)
        return all(p.isdigit() for p in name.split(".")[1:])
    chunk = dirs[2:] + [name]
    return len(dirs) >= 3 and dirs[2] == "c" and all(p.isdigit() for p in chunk[1:])


def is_marker_log(name: str) -> bool:
    """Whether a file name in ``done/`` is a marker log's (``markers.py``)."""
    return name.startswith("markers-") and name.endswith(".jsonl")


def is_marker_file(path: str) -> bool:
    """Whether a file in ``done/`` is a marker log, a marker or a marker's temporary that
    loraforge wrote: a log's first line names a key, as a marker file does its own."""
    name = os.path.basename(path)
    if is_marker_log(name):
        try:
            with open(path, "rb") as f:
                key = json.loads(f.readline()).get("key")
        except (OSError, ValueError, AttributeError):
            return False
        return isinstance(key, str)
    return is_legacy_marker(path)


def is_legacy_marker(path: str) -> bool:
    """Whether a file in ``done/`` is a marker file (or its temporary) of an older loraforge:
    ``<key>.json`` naming its key."""
    name = os.path.basename(path)
    if name != _plain(name):
        return _plain(name).endswith(".json")
    if not name.endswith(".json"):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            key = json.load(f).get("key")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(key, str) and entry_name(key) + ".json" == name


# Deleting is a syscall per file or directory (~0.1 ms each on ext4), which releases the GIL
# and runs side by side in separate directories: 4 threads halve the 0.67 s a Wan-1.3B
# extraction's 3.5k directories and 3.7k files take.
REMOVE_THREADS = 4


def remove_own(
    top: str, ours: Callable[[str, tuple[str, ...]], bool], threads: int = REMOVE_THREADS
) -> list[str]:
    """Delete the files under ``top`` that ``ours(path, parts relative to top)`` claims, then
    the directories left empty (``top`` included); return the files kept, relative to
    ``top``, sorted. ``top``'s subdirectories and its own files are shared out to ``threads``
    threads."""
    try:
        names = os.listdir(top)
    except (FileNotFoundError, NotADirectoryError):
        return []
    dirs = [n for n in names if os.path.isdir(os.path.join(top, n))]  # symlinked ones too
    files = sorted(set(names) - set(dirs))
    subtrees = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
    chunks = [files[i::threads] for i in range(threads)] if files else []
    if threads <= 1:
        parts = [_remove_tree(top, d, ours) for d in subtrees] + [
            _remove_files(top, (), chunk, ours) for chunk in chunks
        ]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda d: _remove_tree(top, d, ours), subtrees))
            parts += pool.map(lambda chunk: _remove_files(top, (), chunk, ours), chunks)
    kept = [k for part in parts for k in part] + [d for d in dirs if d not in subtrees]
    _remove_empty(top)
    return sorted(kept)


def _remove_tree(top: str, name: str, ours) -> list[str]:
    """``remove_own`` below ``top/name``, one thread; kept files relative to ``top``."""
    kept = []
    for directory, dirs, files in os.walk(os.path.join(top, name), topdown=False):
        rel = os.path.relpath(directory, top)
        base = tuple(rel.split(os.sep))
        links = [d for d in dirs if os.path.islink(os.path.join(directory, d))]
        kept += [os.path.join(*base, d) for d in links]  # never followed
        kept += _remove_files(directory, base, files, ours)
        _remove_empty(directory)
    return kept


def _remove_files(directory: str, base: tuple[str, ...], names, ours) -> list[str]:
    """``names`` in ``directory`` (``base``: its parts below the top) that ``ours`` claims
    deleted, symlinks never; the others returned."""
    kept = []
    for name in names:
        path = os.path.join(directory, name)
        if ours(path, (*base, name)) and not os.path.islink(path):
            os.unlink(path)
        else:
            kept.append(os.path.join(*base, name))
    return kept


def _remove_empty(directory: str) -> None:
    try:
        os.rmdir(directory)
    except OSError:
        pass  # not empty: something of the user's is in it


def remove_results(tensors: str) -> list[str]:
    """``tensors/``: loraforge's zarr files removed; the user's files, kept, returned."""
    return remove_own(tensors, lambda path, parts: is_result_file(parts))


def remove_markers(done: str) -> list[str]:
    """``done/``: loraforge's markers removed; the user's files, kept, returned."""
    return remove_own(done, lambda path, parts: len(parts) == 1 and is_marker_file(path))


def remove_entry(entry: str) -> list[str]:
    """One tensor's group in ``tensors/`` (a result recomputed or discarded): loraforge's
    files removed; the user's, kept, returned."""
    name = os.path.basename(entry)
    return remove_own(entry, lambda path, parts: is_result_file((name, *parts)), threads=1)
