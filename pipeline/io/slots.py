"""Where planned tensors' bytes go, and writing them there: by the process that holds the output
(``Slots``) or by a task in any process that has only a ``Slot`` (``write_at``)."""

from __future__ import annotations

import os
import zlib

import torch

from . import safetensors_format as stf
from .crc32c import crc32c
from .direct import pwrite_all, write_bytes
from .layout import OutputEntry, Slot


def tensor_bytes(entry: OutputEntry, tensor: torch.Tensor) -> memoryview:
    """``tensor``'s raw bytes, after checking it is what ``entry`` planned."""
    code = stf.CODE_BY_DTYPE.get(tensor.dtype)
    if code != entry.dtype or tuple(tensor.shape) != entry.shape:
        raise ValueError(
            f"{entry.name}: planned {entry.dtype}{list(entry.shape)}, "
            f"got {code}{list(tensor.shape)}"
        )
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def checksum(data: bytes | memoryview, zip_crc: bool, previous: int | None = None) -> int:
    """The checksum a slot's bytes are recorded with (``previous``: that of the bytes before
    these): CRC-32 where a zip record needs it, else the hardware CRC-32C (13 GB/s here, zlib's
    CRC-32 4 GB/s). ``data``: bytes, or a contiguous view (``tensor_bytes``, a slice of one)."""
    if zip_crc:
        return zlib.crc32(data, previous or 0)
    return crc32c(data, previous or 0)


def write_at(slot: Slot, tensor: torch.Tensor) -> int:
    """Write ``tensor``'s bytes at ``slot`` (the file is opened here, never truncated) and
    return their checksum (``checksum``: zip records need a CRC-32; resume checks it).

    A large tensor's whole pages go past the page cache (``direct.py``). The bytes are not
    synced here: one fsync per tensor serialised a merge on the disk (2.7× the streaming-copy
    time). The output is fsynced once at commit, and a resumed run checks each reused tensor
    against the checksum in its marker (``slot_checksum``), which also covers a machine that
    went down with the bytes still in its page cache."""
    data = tensor_bytes(slot.entry, tensor)
    write_bytes(slot.file, data, slot.offset)
    return checksum(data, slot.zip_crc)


class RowWriter:
    """Writes one planned tensor at its ``slot`` a block of rows at a time, in order (a tensor
    larger than memory is never whole); ``close`` checks every byte arrived and returns the
    checksum of them all, as ``write_at`` does for a whole tensor."""

    def __init__(self, slot: Slot):
        self.slot = slot
        self.written = 0
        self.crc: int | None = None
        self._fd = os.open(slot.file, os.O_WRONLY)

    def destination(self, start: int, stop: int) -> None:
        """None: rows made anywhere are copied out by ``write`` (``StreamedSlot`` instead gives
        the place to make them)."""
        return None

    def write(self, rows: torch.Tensor) -> None:
        entry = self.slot.entry
        if stf.CODE_BY_DTYPE.get(rows.dtype) != entry.dtype or tuple(rows.shape[1:]) != tuple(
            entry.shape[1:]
        ):
            raise ValueError(
                f"{entry.name}: planned rows of {entry.dtype}{list(entry.shape[1:])}, got "
                f"{stf.CODE_BY_DTYPE.get(rows.dtype)}{list(rows.shape[1:])}"
            )
        data = memoryview(rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        pwrite_all(self._fd, data, self.slot.offset + self.written)
        self.written += len(data)
        self.crc = checksum(data, self.slot.zip_crc, self.crc)

    def close(self) -> int:
        os.close(self._fd)
        self._fd = None
        if self.written != self.slot.entry.nbytes:
            raise RuntimeError(
                f"{self.slot.entry.name}: {self.written} of {self.slot.entry.nbytes} bytes written"
            )
        empty = memoryview(b"")
        return self.crc if self.crc is not None else checksum(empty, self.slot.zip_crc)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._fd is not None:
            os.close(self._fd)


def slot_checksum(slot: Slot) -> int | None:
    """The checksum (``checksum``) of the bytes now at ``slot`` (None if the file is
    shorter)."""
    with open(slot.file, "rb") as f:
        f.seek(slot.offset)
        data = f.read(slot.entry.nbytes)
    if len(data) != slot.entry.nbytes:
        return None
    return checksum(data, slot.zip_crc)


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
