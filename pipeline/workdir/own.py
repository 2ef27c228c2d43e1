"""What loraforge writes in a work directory, by name, so that ``clean``, ``--no-keep-work``
and ``--no-resume`` delete exactly that: a file of the user's anywhere inside (in ``tensors/``
or ``done/`` too) is never deleted, and ``clean`` names it.

Inside ``tensors/`` (a zarr v3 store, ``store.py`` and ``zarr_direct.py``): ``zarr.json`` of the
root group, of each tensor's group ``<entry>/`` and of each of its arrays ``<entry>/<array>/``,
and the arrays' chunks ``<entry>/<array>/c`` or ``c/<i>/<j>/...`` (digits). Inside ``done/``:
markers ``<entry>.json`` whose ``key`` is that entry's. Anywhere: the temporaries
``.<name>.partial`` of those files (``io/atomic.py``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
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
    if len(dirs) == 2 and name == "c":  # a 0-d array's one chunk
        return True
    chunk = dirs[2:] + [name]
    return len(dirs) >= 3 and dirs[2] == "c" and all(p.isdigit() for p in chunk[1:])


def is_marker_file(path: str) -> bool:
    """Whether a file in ``done/`` is a marker (or a marker's temporary) loraforge wrote."""
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


def remove_own(top: str, ours: Callable[[str, tuple[str, ...]], bool]) -> list[str]:
    """Delete the files under ``top`` that ``ours(path, parts relative to top)`` claims, then
    the directories left empty (``top`` included); return the files kept, relative to
    ``top``, sorted."""
    kept = []
    for directory, dirs, files in os.walk(top, topdown=False):
        rel = os.path.relpath(directory, top)
        base = () if rel == "." else tuple(rel.split(os.sep))
        links = [d for d in dirs if os.path.islink(os.path.join(directory, d))]
        kept += [os.path.join(*base, name) for name in links]  # never followed
        for name in files:
            path = os.path.join(directory, name)
            if ours(path, (*base, name)) and not os.path.islink(path):
                os.unlink(path)
            else:
                kept.append(os.path.join(*base, name))
        try:
            os.rmdir(directory)
        except OSError:
            pass  # not empty: something of the user's is in it
    return sorted(kept)


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
    return remove_own(entry, lambda path, parts: is_result_file((name, *parts)))
