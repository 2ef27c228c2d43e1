"""Writes a zarr v3 float32 array straight to a directory: ``zarr.json`` plus one file per
chunk, encoded with the ``bytes`` (little-endian) and ``crc32c`` codecs — exactly what
``zarr.create_array(..., compressors=[Crc32cCodec()], chunk_key_encoding={"name": "default",
"separator": "."})`` writes, read back by zarr itself. The ``.`` separator keeps a chunk
(``c.0.0``) in its array's directory: ``/`` (``c/0/0``, which older work directories hold and
``read_array`` still reads) cost two more directories per array to make and delete.

Why not zarr's own writer: every zarr call hops to its event-loop thread and each file to a
thread pool, about 4 ms of Python per array under the GIL. Tasks storing one tensor's result
per call spent more time there than in the SVD (5 s of a 20 s run on the 1.3B benchmark).
``read_array`` reads back exactly this layout (every chunk's CRC-32C checked) for the same
reason: zarr's reader spent half the write stage parsing metadata. An array in any other layout
returns None and is read by zarr (``WorkDir.load_many``); the tests read what we write with zarr
itself, so a layout mistake here fails loudly."""

from __future__ import annotations

import itertools
import json
import math
import os

import google_crc32c
import numpy as np

from ..io.atomic import write_text

_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]


SEPARATOR = "."  # of the chunk keys written; "/" is read too


def array_metadata(
    shape: tuple[int, ...], chunks: tuple[int, ...], attributes: dict, separator: str = SEPARATOR
) -> dict:
    return {
        "shape": list(shape),
        "data_type": "float32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
        "fill_value": 0.0,
        "codecs": _CODECS,
        "attributes": attributes,
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def group_metadata() -> dict:
    return {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def _write_metadata(directory: str, document: dict) -> None:
    write_text(os.path.join(directory, "zarr.json"), json.dumps(document, indent=2))


def write_group(directory: str) -> None:
    """An empty zarr v3 group's metadata in ``directory`` (which must exist)."""
    _write_metadata(directory, group_metadata())


def _chunk_key(index: tuple[int, ...], separator: str = SEPARATOR) -> str:
    return separator.join(["c", *map(str, index)])


def _write_chunk(directory: str, index: tuple[int, ...], block: np.ndarray, chunks) -> None:
    if block.shape != tuple(chunks):  # an edge chunk: padded to the full chunk shape
        padded = np.zeros(chunks, dtype="<f4")
        padded[tuple(slice(0, n) for n in block.shape)] = block
        block = padded
    data = np.ascontiguousarray(block).tobytes()
    with open(os.path.join(directory, _chunk_key(index)), "wb") as f:
        f.write(data)
        f.write(google_crc32c.value(data).to_bytes(4, "little"))


def write_array(
    directory: str, array: np.ndarray, chunks: tuple[int, ...], attributes: dict | None = None
) -> None:
    """``array`` (float32) as a zarr v3 array in ``directory`` (created). Edge chunks are
    padded with the fill value to the full chunk shape, as the regular grid requires."""
    array = np.asarray(array, dtype="<f4", order="C")  # (ascontiguousarray makes 0-d 1-d)
    os.makedirs(directory, exist_ok=True)
    if array.size:
        grid = [range(math.ceil(n / c)) for n, c in zip(array.shape, chunks, strict=True)]
        for index in itertools.product(*grid):
            block = array[
                tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunks, strict=True))
            ]
            _write_chunk(directory, index, block, chunks)
    _write_metadata(directory, array_metadata(array.shape, chunks, attributes or {}))


class RowChunkWriter:
    """A zarr v3 array written a chunk of rows at a time (chunks span every other dimension),
    for an array larger than memory; its metadata is written by ``close``, after every chunk,
    so an interrupted write leaves no array zarr would open."""

    def __init__(self, directory: str, shape: tuple[int, ...], chunk_rows: int):
        self.directory, self.shape = directory, tuple(shape)
        self.chunks = (chunk_rows, *self.shape[1:])
        self.rows = 0
        os.makedirs(directory, exist_ok=True)

    def write(self, block: np.ndarray) -> None:
        """The next ``chunk_rows`` rows (fewer only for the last chunk)."""
        block = np.asarray(block, dtype="<f4", order="C")
        if block.shape[1:] != self.shape[1:] or (
            block.shape[0] != self.chunks[0] and self.rows + block.shape[0] != self.shape[0]
        ):
            raise ValueError(f"expected a chunk of {list(self.chunks)}, got {list(block.shape)}")
        index = (self.rows // self.chunks[0],) + (0,) * (len(self.shape) - 1)
        _write_chunk(self.directory, index, block, self.chunks)
        self.rows += block.shape[0]

    def close(self, attributes: dict | None = None) -> None:
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.rows} of {self.shape[0]} rows written")
        _write_metadata(self.directory, array_metadata(self.shape, self.chunks, attributes or {}))


class ChecksumMismatch(ValueError):
    """A chunk whose bytes do not match their CRC-32C."""


def read_array(directory: str) -> tuple[np.ndarray, dict] | None:
    """The array and attributes ``write_array`` (or ``RowChunkWriter``) wrote in ``directory``;
    None when its ``zarr.json`` describes another layout (read it with zarr). Every chunk must be
    there (ours writes each one; zarr's skips chunks equal to the fill value): a missing or
    damaged chunk raises (``OSError``, ``ChecksumMismatch``, ``ValueError``)."""
    with open(os.path.join(directory, "zarr.json")) as f:
        meta = json.load(f)
    shape = tuple(meta.get("shape", ()))
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
    separator = meta.get("chunk_key_encoding", {}).get("configuration", {}).get("separator")
    layout = dict(meta, shape=list(shape), attributes={})
    if (
        grid is None
        or separator not in ("/", ".")
        or layout != array_metadata(shape, tuple(grid), {}, separator)
    ):
        return None
    chunks = tuple(grid)
    out = np.empty(shape, dtype="<f4")
    chunk_bytes = 4 * math.prod(chunks)
    ranges = [range(math.ceil(n / c)) for n, c in zip(shape, chunks, strict=True)]
    for index in itertools.product(*ranges) if out.size else ():
        with open(os.path.join(directory, _chunk_key(index, separator)), "rb") as f:
            raw = f.read()
        data, crc = raw[:-4], raw[-4:]
        if len(data) != chunk_bytes or google_crc32c.value(data).to_bytes(4, "little") != crc:
            raise ChecksumMismatch(f"chunk {index} of {directory}: damaged or of another size")
        block = np.frombuffer(data, dtype="<f4").reshape(chunks)
        spans = zip(index, chunks, shape, strict=True)
        region = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in spans)
        out[region] = block[tuple(slice(0, r.stop - r.start) for r in region)]
    return out, dict(meta.get("attributes") or {})
