"""Streaming writers: the layout is fixed up front from planned names, dtypes and shapes, then
tensors are written at their offsets in any order, so the whole output is never in memory.

Files are written under hidden temporary names and renamed when every tensor is in; with
shards, the index is renamed last. ``abort`` removes the temporaries."""

from __future__ import annotations

import os
import zlib

import torch

from ..errors import OutputError
from . import safetensors_format as stf
from .atomic import remove_quietly, temporary_name, write_json
from .layout import OutputEntry, Slot, index_file_name, shard_file_names, split_shards


def tensor_bytes(entry: OutputEntry, tensor: torch.Tensor) -> memoryview:
    """``tensor``'s raw bytes, after checking it is what ``entry`` planned."""
    code = stf.CODE_BY_DTYPE.get(tensor.dtype)
    if code != entry.dtype or tuple(tensor.shape) != entry.shape:
        raise ValueError(
            f"{entry.name}: planned {entry.dtype}{list(entry.shape)}, "
            f"got {code}{list(tensor.shape)}"
        )
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


def write_at(slot: Slot, tensor: torch.Tensor) -> int:
    """Write ``tensor``'s bytes at ``slot`` (the file is opened here, never truncated) and
    return their CRC-32 (zip records need it; resume checks it).

    The bytes are not synced here: one fsync per tensor serialised a merge on the disk (2.7×
    the streaming-copy time). The output is fsynced once at commit, and a resumed run checks
    each reused tensor against the CRC-32 in its marker (``slot_crc32``), which also covers a
    machine that went down with the bytes still in its page cache."""
    data = tensor_bytes(slot.entry, tensor)
    fd = os.open(slot.file, os.O_WRONLY)
    try:
        pwrite_all(fd, data, slot.offset)
    finally:
        os.close(fd)
    return zlib.crc32(data)


def slot_crc32(slot: Slot) -> int | None:
    """CRC-32 of the bytes now at ``slot`` (None if the file is shorter)."""
    with open(slot.file, "rb") as f:
        f.seek(slot.offset)
        data = f.read(slot.entry.nbytes)
    return zlib.crc32(data) if len(data) == slot.entry.nbytes else None


def _reopen_if_matching(tmp: str, header: bytes, size: int) -> int | None:
    """An fd on ``tmp`` when it exists with exactly ``header`` and ``size`` (a temporary left by
    an interrupted run of the same plan), else None."""
    try:
        fd = os.open(tmp, os.O_RDWR)
    except OSError:
        return None
    if os.fstat(fd).st_size == size and os.pread(fd, len(header), 0) == header:
        return fd
    os.close(fd)
    return None


def _open_output(path: str) -> int:
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise OutputError(
            f"cannot write here ({e.strerror})",
            path=path,
            hint="choose a writable --output location",
        ) from None


class Slots:
    """Where each planned tensor goes: name -> (fd, begin, entry); tracks what has arrived."""

    def __init__(self):
        self.where: dict[str, tuple[int, int, OutputEntry]] = {}
        self.missing: set[str] = set()

    def add(self, fd: int, begin: int, entry: OutputEntry) -> None:
        self.where[entry.name] = (fd, begin, entry)
        self.missing.add(entry.name)

    def write(self, name: str, tensor: torch.Tensor) -> tuple[int, memoryview]:
        fd, begin, entry = self.where[name]
        data = tensor_bytes(entry, tensor)
        pwrite_all(fd, data, begin)
        self.missing.discard(name)
        return begin, data

    def check_complete(self) -> None:
        if self.missing:
            raise RuntimeError(
                f"{len(self.missing)} planned tensors were never written, e.g. "
                f"{sorted(self.missing)[0]}"
            )


class SafetensorsOutput:
    """One ``.safetensors`` file at ``output``, or Hugging Face shards + index when the entries
    exceed ``max_shard_size``.

    With ``reuse``, a temporary whose header and size already match the plan (left by an
    interrupted run) is kept instead of truncated; ``reused`` lists the output files it was kept
    for, so the caller can trust the tensors it knows were written there."""

    def __init__(
        self,
        output: str,
        entries: list[OutputEntry],
        max_shard_size: int | None = None,
        metadata: dict[str, str] | None = None,
        reuse: bool = False,
    ):
        by_name = {e.name: e for e in entries}
        groups = split_shards([(e.name, e.nbytes) for e in entries], max_shard_size)
        self.files = shard_file_names(output, len(groups))
        self.index = index_file_name(output) if len(groups) > 1 else None
        self.total_size = sum(e.nbytes for e in entries)
        self.weight_map: dict[str, str] = {}
        self.reused: set[str] = set()
        self._fds: list[tuple[int, str, str]] = []
        self._files_of: dict[str, tuple[str, str]] = {}  # name -> (temporary, final file)
        self._slots = Slots()
        try:
            for file, names in zip(self.files, groups, strict=True):
                header, offsets = stf.encode_header(
                    [(n, by_name[n].dtype, by_name[n].shape) for n in names], metadata
                )
                tmp = temporary_name(file)
                size = offsets[-1][1] if offsets else len(header)
                fd = _reopen_if_matching(tmp, header, size) if reuse else None
                if fd is not None:
                    self.reused.add(file)
                else:
                    fd = _open_output(tmp)
                    os.pwrite(fd, header, 0)
                    os.ftruncate(fd, size)
                self._fds.append((fd, tmp, file))
                for name, (begin, _end) in zip(names, offsets, strict=True):
                    self._slots.add(fd, begin, by_name[name])
                    self._files_of[name] = (tmp, file)
                    self.weight_map[name] = os.path.basename(file)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._slots.write(name, tensor)

    def slot(self, name: str) -> Slot:
        """Where ``name`` goes, for a writer elsewhere (``write_at``); then ``mark_written``."""
        _fd, begin, entry = self._slots.where[name]
        return Slot(self._files_of[name][0], begin, entry)

    def final_file(self, name: str) -> str:
        """The output file (shard) that will hold ``name``."""
        return self._files_of[name][1]

    def mark_written(self, name: str, crc: int = 0) -> None:
        """Record that ``name``'s bytes were written through its ``slot`` (``crc`` unused)."""
        self._slots.missing.discard(name)

    def close(self) -> None:
        """Close the temporaries but keep them, so an interrupted run can be resumed."""
        for fd, _tmp, _file in self._fds:
            os.close(fd)
        self._fds = []

    def commit(self) -> list[str]:
        self._slots.check_complete()
        for fd, _tmp, _file in self._fds:
            os.fsync(fd)
            os.close(fd)
        for _fd, tmp, file in self._fds:
            os.replace(tmp, file)
        self._fds = []
        if self.index:
            write_json(
                self.index,
                {
                    "metadata": {"total_size": self.total_size},
                    "weight_map": dict(sorted(self.weight_map.items())),
                },
            )
            return [*self.files, self.index]
        return list(self.files)

    def abort(self) -> None:
        for fd, tmp, _file in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
            remove_quietly(tmp)
        self._fds = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()


def open_output(
    output: str,
    output_format: str,
    entries: list[OutputEntry],
    max_shard_size: int | None = None,
    metadata: dict[str, str] | None = None,
    reuse: bool = False,
):
    if output_format == "pytorch":
        from .pytorch_writer import PytorchOutput

        return PytorchOutput(output, entries, reuse)
    return SafetensorsOutput(output, entries, max_shard_size, metadata, reuse)
