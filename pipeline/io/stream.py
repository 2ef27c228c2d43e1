"""A tensor's bytes written at its slot while they are being made, and after.

The producer fills the tensor's page-aligned buffer (``aligned_tensor``) front to back, a block
of rows at a time, and hands each block over (``write``); every ``CHUNK`` of whole pages then
goes to the disk past the page cache (``direct.py``) on this process's writer thread, so the
disk writes the front of a tensor while the back is computed. The checksum is taken block by
block while the block is still in the cache. The partial pages at either end, which neighbours
share, are written through the page cache by the writer thread too: a buffered write waits for
the file's direct writes in flight (ext4 holds the inode lock), which would stall the task.

``close`` hands the last pages over. With ``behind``, it returns at once: the task goes on to
its next tensor in this thread's other buffer while the disk finishes this one, and the run
calls ``finish_writes`` before it commits (only a run whose tasks share its process can: the
in-process scheduler). Without, ``close`` waits for the disk.

One writer thread, first in first out: a tensor's pages go in order (the first one tells
whether the filesystem takes ``O_DIRECT``), and a direct write of a few MB already keeps a
disk's queue full (the kernel splits it). Where a direct write is not possible (a small tensor,
a filesystem ``direct.py`` leaves alone, a buffer that could not be placed), ``close`` writes
the whole tensor as ``write_bytes`` does, and waits."""

from __future__ import annotations

import errno
import os
import threading
from collections import deque
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .direct import (
    LOCAL_FILESYSTEMS,
    MIN_DIRECT,
    PAGE,
    aligned_tensor,
    filesystem_of,
    pwrite_all,
    write_bytes,
    write_direct_chunk,
)
from .layout import Slot
from .slots import checksum

CHUNK = 2 << 20  # whole pages handed to the writer thread at a time
BUFFERS = ("stream-a", "stream-b")  # a thread's result buffers: one made while one is written

_writer: ThreadPoolExecutor | None = None
_guard = threading.Lock()
_handed_over: list[StreamedSlot] = []  # closed with ``behind``, not yet finished
_local = threading.local()


def _writer_thread() -> ThreadPoolExecutor:
    global _writer
    with _guard:
        if _writer is None:
            _writer = ThreadPoolExecutor(1, thread_name_prefix="loraforge-writer")
        return _writer


def finish_writes(files: Collection[str], raise_errors: bool = True) -> None:
    """Wait until every tensor handed over with ``behind`` into ``files`` (a run's temporary
    outputs; another run in this process has its own) is written; raise the first write that
    failed (an ``OSError`` naming the file), unless ``raise_errors`` is false (the run is
    failing already: only make sure nothing is written after it ends)."""
    files = set(files)
    with _guard:
        streams = [s for s in _handed_over if s.slot.file in files]
        _handed_over[:] = [s for s in _handed_over if s.slot.file not in files]
    failure = None
    for stream in streams:
        try:
            stream.wait()
        except OSError as e:
            failure = failure or e
    if failure is not None and raise_errors:
        raise failure


def _free_buffer() -> str:
    """The role of this thread's result buffer no write still reads: a free one, else the
    one written longest ago, once its writes are done."""
    if not hasattr(_local, "busy"):
        _local.busy = deque()  # (role, stream) in the order handed over
    busy: deque = _local.busy
    while busy and busy[0][1].done():
        busy.popleft()
    taken = {role for role, _stream in busy}
    for role in BUFFERS:
        if role not in taken:
            return role
    role, stream = busy.popleft()
    stream.wait(raise_errors=False)  # its error, if any, is raised by finish_writes
    return role


class StreamedSlot:
    """Writes one planned tensor at ``slot`` as its rows are made, in order: ``destination``
    gives the rows of the result buffer to fill, ``write`` takes them once filled, ``close``
    returns the checksum of all the bytes (as ``write_at`` does) once they are handed to the
    disk (``behind``) or written. The same calls as ``RowWriter``, which writes rows made
    anywhere."""

    def __init__(self, slot: Slot, dtype: torch.dtype, behind: bool = False):
        self.slot = slot
        self.behind = behind
        self.role = _free_buffer()
        self.buffer = aligned_tensor(tuple(slot.entry.shape), dtype, slot.offset, self.role)
        flat = self.buffer.reshape(-1).view(torch.uint8)
        self._bytes = flat.numpy() if flat.numel() else np.empty(0, np.uint8)
        self._address = self._bytes.ctypes.data
        self.nbytes = slot.entry.nbytes
        self.filled = 0
        self.crc: int | None = None
        self._first = -(-slot.offset // PAGE) * PAGE
        self._last = (slot.offset + self.nbytes) // PAGE * PAGE
        self._sent = self._first
        self._pending: list[Future] = []
        self._refused = False
        self._fd = self._open_direct()

    def _open_direct(self) -> int | None:
        """An ``O_DIRECT`` descriptor when the whole pages can go direct from the buffer."""
        placed = (self._address + self._first - self.slot.offset) % PAGE == 0
        if (
            self._last - self._first < MIN_DIRECT
            or not placed
            or filesystem_of(self.slot.file) not in LOCAL_FILESYSTEMS
        ):
            return None
        try:
            return os.open(self.slot.file, os.O_WRONLY | os.O_DIRECT)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return None
            raise

    def destination(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the result, to be filled and then passed to ``write``."""
        return self.buffer[start:stop]

    def write(self, rows: torch.Tensor) -> None:
        """Take the next rows, filled in place (``destination``)."""
        nbytes = rows.numel() * rows.element_size()
        if rows.data_ptr() != self._address + self.filled or not rows.is_contiguous():
            raise ValueError(f"{self.slot.entry.name}: rows written out of order or elsewhere")
        block = self._bytes[self.filled : self.filled + nbytes]
        self.crc = checksum(memoryview(block), self.slot.zip_crc, self.crc)
        self.filled += nbytes
        if self._fd is not None:
            ready = min((self.slot.offset + self.filled) // PAGE * PAGE, self._last)
            if ready - self._sent >= CHUNK:
                self._send(ready)

    def _send(self, stop: int) -> None:
        start, self._sent = self._sent, stop
        self._submit(self._write_pages, start, stop)

    def _submit(self, job, *args) -> None:
        self._pending.append(_writer_thread().submit(job, *args))

    def _write_pages(self, start: int, stop: int) -> None:
        """On the writer thread: the file's pages ``start:stop`` from the buffer."""
        if self._refused:
            return
        offset = self.slot.offset
        chunk = self._bytes[start - offset : stop - offset]
        try:
            write_direct_chunk(self._fd, chunk, start, self.slot.file)
        except OSError as e:
            if e.errno == errno.EINVAL and start == self._first:  # refused on first use
                self._refused = True
                return
            raise

    def _write_ends(self) -> None:
        """On the writer thread, after the direct pages: the partial pages at either end
        through the page cache (all of the bytes where ``O_DIRECT`` was refused)."""
        data, offset = memoryview(self._bytes), self.slot.offset
        fd = os.open(self.slot.file, os.O_WRONLY)
        try:
            if self._refused:
                pwrite_all(fd, data, offset)
            else:
                pwrite_all(fd, data[: self._first - offset], offset)
                pwrite_all(fd, data[self._last - offset :], self._last)
        finally:
            os.close(fd)
            self._close_direct()
            self._drop_buffer()

    def close(self) -> int:
        """Every byte handed over (``behind``) or written; the checksum of them all."""
        if self.filled != self.nbytes:
            raise RuntimeError(f"{self.slot.entry.name}: {self.filled} of {self.nbytes} bytes made")
        if self._fd is None:
            write_bytes(self.slot.file, memoryview(self._bytes), self.slot.offset)
            self._drop_buffer()
        else:
            if self._sent < self._last:
                self._send(self._last)
            self._submit(self._write_ends)
            if self.behind:
                with _guard:
                    _handed_over.append(self)
                _local.busy.append((self.role, self))
            else:
                self.wait()
        return self.crc if self.crc is not None else checksum(memoryview(b""), self.slot.zip_crc)

    def done(self) -> bool:
        return all(future.done() for future in self._pending)

    def wait(self, raise_errors: bool = True) -> None:
        """Until the writes handed over are done; the first that failed is raised."""
        failure = None
        for future in self._pending:
            try:
                future.result()
            except OSError as e:
                failure = failure or e
        self._close_direct()
        if failure is not None and raise_errors:
            raise failure

    def _drop_buffer(self) -> None:
        """Written: the buffer is the thread's again, and a mapping it outgrew (``aligned_tensor``
        grows by remapping) is freed now, not when the run's last write is waited for."""
        self.buffer = self._bytes = None

    def _close_direct(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:  # nothing handed over: the buffer is reused at once
            self.wait(raise_errors=False)
