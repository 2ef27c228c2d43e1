"""The work directory: per-tensor results in a zarr v3 store, completion markers, the manifest.

Layout::

    <work>/tensors/          zarr group; one child group per tensor with fp32 arrays
                             (up, down, s for low-rank results; diff for diffs), crc32c-checked
    <work>/done/             markers: a line per tensor in a log per process (``markers.py``),
                             written only after the arrays, with the fingerprint of what
                             produced them; no marker = not finished
    <work>/run.json          the last run's options and input fingerprints
    <work>/lock.json         pid and host of the run using the directory (``lock.py``)
    <work>/loraforge-work-dir.json   says loraforge made the directory

One task owns one tensor's group, so no two tasks write the same chunk.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import numpy as np

from .. import __version__
from ..errors import WorkDirConflict
from ..io.atomic import remove_quietly, temporary_name, write_json
from . import markers, zarr_direct
from .lock import RunLock
from .own import entry_name, remove_entry, remove_markers, remove_results

# Rows per chunk are chosen so a chunk holds about this many bytes.
_CHUNK_BYTES = 64 * 2**20


class CorruptEntry(Exception):
    """An intermediate that has a marker but cannot be read back intact."""


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    if not shape:
        return ()
    row = 4 * int(np.prod(shape[1:], dtype=np.int64))
    return (max(1, min(shape[0], _CHUNK_BYTES // max(row, 1))), *shape[1:])


# The file that says loraforge made a directory: only such a directory (or an empty one) is used
# as a work directory, and only what loraforge writes in it is ever deleted.
OWNER_FILE = "loraforge-work-dir.json"
# What loraforge writes in a work directory (an older loraforge wrote the same, less OWNER_FILE).
OWN_ENTRIES = ("tensors", "done", "run.json", "lock.json", OWNER_FILE)


class WorkDir:
    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.tensors = os.path.join(self.path, "tensors")
        self.done = os.path.join(self.path, "done")

    def is_loraforges(self) -> bool:
        """Whether the directory exists and loraforge made it: it has the owner file, or holds
        nothing but loraforge's own entries (left by an older loraforge, or by a run killed
        between taking the lock and writing the owner file)."""
        try:
            names = set(os.listdir(self.path))
        except OSError:
            return False
        return OWNER_FILE in names or bool(names and names <= set(OWN_ENTRIES))

    def check_usable(self) -> None:
        """Refuse a path that is not a new, empty or loraforge-made directory: a run writes
        there, and ``--no-keep-work`` / ``clean`` delete there."""
        if not os.path.lexists(self.path):
            return
        if not os.path.isdir(self.path):
            raise WorkDirConflict(
                "exists and is not a directory",
                path=self.path,
                hint="pass a new or empty directory as --work-dir",
            )
        names = sorted(os.listdir(self.path))
        if names and not self.is_loraforges():
            foreign = [n for n in names if n not in OWN_ENTRIES] or names
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise WorkDirConflict(
                f"exists and was not made by loraforge (it holds {foreign[0]}{more})",
                path=self.path,
                hint="pass a new or empty directory as --work-dir",
            )

    def create(self) -> None:
        os.makedirs(self.done, exist_ok=True)
        owner = os.path.join(self.path, OWNER_FILE)
        if not os.path.exists(owner):
            write_json(owner, {"created_by": "loraforge", "version": __version__})
        if not os.path.exists(os.path.join(self.tensors, "zarr.json")):  # the root group
            os.makedirs(self.tensors, exist_ok=True)
            zarr_direct.write_group(self.tensors)

    def _legacy_marker_path(self, key: str) -> str:
        """Where an older loraforge kept ``key``'s marker (``markers.py`` reads it still)."""
        return os.path.join(self.done, entry_name(key) + ".json")

    def markers(self) -> dict[str, dict]:
        """Every finished tensor's marker, by key (``markers.py``): read once per resume."""
        return markers.read_all(self.done)

    def read_marker(self, key: str) -> dict | None:
        return self.markers().get(key)

    def close_logs(self) -> None:
        """Close this process's marker log here (reopened by its next line)."""
        markers.close_logs(self.done)

    def _withdraw_marker(self, key: str) -> None:
        """``key`` is being recomputed: its marker no longer counts."""
        remove_quietly(self._legacy_marker_path(key))
        markers.append(self.done, key, {"removed": True})

    def save(
        self,
        key: str,
        arrays: dict[str, np.ndarray],
        marker: dict,
        attributes: dict[str, dict] | None = None,
    ) -> None:
        """Store ``arrays`` (with optional zarr attributes per array) for ``key``, then the
        marker that makes them count (``marker`` gains the list of array names)."""
        entry = self._new_entry(key)
        for name, array in arrays.items():
            zarr_direct.write_array(
                os.path.join(entry, name),
                array,
                _chunks(tuple(array.shape)),
                (attributes or {}).get(name),
            )
        marker["arrays"] = sorted(arrays)
        self.write_marker(key, marker)

    def _new_entry(self, key: str) -> str:
        """``key``'s group, emptied (and its marker withdrawn) for a new result."""
        self._withdraw_marker(key)
        entry = os.path.join(self.tensors, entry_name(key))
        remove_entry(entry)
        os.makedirs(entry, exist_ok=True)  # a user's file in it is kept
        zarr_direct.write_group(entry)
        return entry

    def row_writer(
        self, key: str, name: str, shape: tuple[int, ...], chunk_rows: int
    ) -> zarr_direct.RowChunkWriter:
        """``key``'s one array ``name``, to be written a chunk of ``chunk_rows`` rows at a time
        (a result larger than memory); ``write_marker`` with ``arrays`` makes it count."""
        entry = self._new_entry(key)
        return zarr_direct.RowChunkWriter(os.path.join(entry, name), shape, chunk_rows)

    def write_marker(self, key: str, marker: dict) -> None:
        """The marker alone: for commands whose result lives elsewhere (merge's output). It
        names its key, which is how ``clean`` tells it from a file of the user's (``own.py``)."""
        markers.append(self.done, key, marker)

    def attributes(self, key: str, name: str) -> dict:
        """One stored array's zarr attributes, read from its ``zarr.json`` without opening the
        array: a rank decision reads every tensor's singular values before the output is laid
        out. Unreadable metadata raises ``CorruptEntry``."""
        path = os.path.join(self.tensors, entry_name(key), name, "zarr.json")
        try:
            with open(path) as f:
                return dict(json.load(f)["attributes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptEntry(f"{key}/{name}: {type(e).__name__}: {e}") from None

    def load(self, key: str, marker: dict) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        """The arrays named by ``marker`` and their attributes; anything unreadable or
        mis-shaped raises ``CorruptEntry``."""
        result = self.load_many([(key, marker)])[key]
        if isinstance(result, CorruptEntry):
            raise result
        return result

    def row_chunks(self, key: str, name: str, shape: list[int]) -> Iterator[np.ndarray]:
        """``key``'s array ``name`` a stored chunk of rows at a time (a result larger than
        memory, written by ``row_writer``); anything unreadable or of another shape raises
        ``CorruptEntry``."""
        import zarr  # only here and for arrays zarr made: importing it costs 0.15 s a command
        import zarr.storage

        store = zarr.storage.LocalStore(self.tensors, read_only=True)
        try:
            array = zarr.open_array(store=store, path=f"{entry_name(key)}/{name}", mode="r")
            if list(array.shape) != list(shape):
                raise ValueError(f"expected shape {shape}, found {list(array.shape)}")
            rows = array.chunks[0]
            for start in range(0, array.shape[0], rows):
                yield array[start : start + rows]
        except Exception as e:  # zarr raises many types for missing/truncated chunks
            raise CorruptEntry(f"{key}/{name}: {type(e).__name__}: {e}") from None

    def load_many(self, entries: list[tuple[str, dict]]) -> dict:
        """``load`` for several entries. Arrays in the layout loraforge writes are read directly
        (``zarr_direct``); any other (made by zarr itself) goes through zarr, all of them in
        one pass of its event loop (each call into zarr's synchronous API costs a thread hop
        per array). Values are ``(arrays, attributes)`` or a ``CorruptEntry``."""
        results, by_zarr = {}, {}
        for key, marker in entries:
            names = marker.get("arrays", [])
            stored = {name: self._read_direct(key, name) for name in names}
            if any(value is None for value in stored.values()):
                by_zarr[key] = marker, stored
            else:
                results[key] = _checked(key, marker, stored)
        if by_zarr:
            results.update(self._load_with_zarr(by_zarr))
        return {key: results[key] for key, _ in entries}

    def _read_direct(self, key: str, name: str):
        """``read_array``'s result, a ``CorruptEntry`` for damage, or None (not our layout)."""
        try:
            return zarr_direct.read_array(os.path.join(self.tensors, entry_name(key), name))
        except Exception as e:  # missing file, bad JSON, checksum, short chunk
            return CorruptEntry(f"{key}/{name}: {type(e).__name__}: {e}")

    def _load_with_zarr(self, entries: dict[str, tuple[dict, dict]]) -> dict:
        """The entries whose arrays read directly (``stored``) left some None: those by zarr."""
        import zarr.api.asynchronous as zarr_async
        import zarr.storage

        store = zarr.storage.LocalStore(self.tensors, read_only=True)

        async def one(key: str, marker: dict, stored: dict):
            for name in [name for name, value in stored.items() if value is None]:
                try:
                    array = await zarr_async.open_array(
                        store=store, path=f"{entry_name(key)}/{name}", mode="r"
                    )
                    stored[name] = await array.getitem(...), dict(array.attrs)
                except Exception as e:  # zarr raises many types for missing/truncated chunks
                    stored[name] = CorruptEntry(f"{key}/{name}: {type(e).__name__}: {e}")
            return _checked(key, marker, stored)

        async def everything():
            return await asyncio.gather(*(one(key, *entry) for key, entry in entries.items()))

        # A private event loop per batch: zarr's own (``zarr.core.sync``) is not public API.
        return dict(zip(entries, asyncio.run(everything()), strict=True))

    def clear(self) -> list[str]:
        """Forget every result (``--no-resume``, or a merge whose inputs changed): delete what
        loraforge wrote in ``tensors/`` and ``done/`` (``own.py``); return the files of the
        user's kept there, relative to the work directory."""
        self.close_logs()
        kept = [os.path.join("tensors", k) for k in remove_results(self.tensors)]
        return kept + [os.path.join("done", k) for k in remove_markers(self.done)]

    def remove(self, lock: RunLock | None = None) -> list[str]:
        """Delete what loraforge made here (results, markers, manifest), release ``lock`` (the
        caller's: no run starts here while they go), then delete the directory itself if
        nothing else is left in it: a user's own files are never deleted. Return the files
        (and symlinks) kept, relative to the directory, sorted."""
        try:
            self.clear()
            for path in (self.manifest_path, os.path.join(self.path, OWNER_FILE)):
                remove_quietly(path)
                remove_quietly(temporary_name(path))
        finally:
            if lock is not None:
                lock.release()
        try:
            os.rmdir(self.path)
            return []
        except OSError:  # not empty: someone else's files (or the lock of a live run)
            return _files_under(self.path)

    def discard(self, key: str) -> None:
        self._withdraw_marker(key)
        remove_entry(os.path.join(self.tensors, entry_name(key)))

    def size_bytes(self) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total

    # ---- previous run's manifest ----
    @property
    def manifest_path(self) -> str:
        return os.path.join(self.path, "run.json")

    def read_manifest(self) -> dict | None:
        try:
            with open(self.manifest_path) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def write_manifest(self, manifest: dict) -> None:
        write_json(self.manifest_path, manifest)


def _checked(key: str, marker: dict, stored: dict):
    """An entry's ``(arrays, attributes)`` from what was read per array, or the first
    ``CorruptEntry`` among them, or one for an array missing or of another shape than the
    marker's."""
    arrays, attributes = {}, {}
    for name, value in stored.items():
        if isinstance(value, CorruptEntry):
            return value
        arrays[name], attributes[name] = value
    for name, shape in marker.get("array_shapes", {}).items():
        if name not in arrays or list(arrays[name].shape) != list(shape):
            return CorruptEntry(f"{key}/{name}: expected shape {shape}")
    return arrays, attributes


def _files_under(path: str) -> list[str]:
    """Every file (or symlink) under ``path``, relative to it, sorted."""
    found = []
    for directory, dirs, files in os.walk(path):
        rel = os.path.relpath(directory, path)
        links = [d for d in dirs if os.path.islink(os.path.join(directory, d))]
        found += [os.path.normpath(os.path.join(rel, name)) for name in files + links]
    return sorted(found)
