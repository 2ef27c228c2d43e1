"""Inside a task: per-thread buffers reused across tasks, and, for GPU tasks, the per-device
lock and pinned host staging that overlap one thread's read with another's kernel (the design
is in ``gpu.py``).

Filling fresh pages costs more than the arithmetic on them (page faults: ~1 GB/s into new
memory against 10+ GB/s into a reused buffer), so each worker thread keeps, per role, the
largest buffer it has needed and hands out views of it. Memory stays bounded by the largest
tensor per thread and role. Pinned staging is sized once per thread from the plan instead
(``reserve_staging``)."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Sequence

import torch

_local = threading.local()  # pinned staging (see below)
# Reusable buffers by thread ident, then (role, dtype, device). A registry rather than
# thread-locals so the memory gate (memory.py) can count them and free an idle thread's.
_buffers: dict[int, dict[tuple, torch.Tensor]] = {}
_buffers_guard = threading.Lock()


def thread_buffer(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
    role: str,
) -> torch.Tensor:
    """An uninitialised ``shape`` view of this thread's ``role`` buffer. Two views of one role
    alias each other: give each live buffer its own role. (Pinned staging is not one of these:
    see ``reserve_staging``.)"""
    ident = threading.get_ident()
    if ident not in _buffers:
        free_dead_threads()
    with _buffers_guard:
        buffers = _buffers.setdefault(ident, {})
    key = (role, dtype, torch.device(device))
    numel = math.prod(shape)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers[key] = None  # free the smaller one first
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def free_dead_threads() -> None:
    """Drop the buffers of threads that have ended (a finished run's worker pool)."""
    alive = {t.ident for t in threading.enumerate()}
    with _buffers_guard:
        for ident in [i for i in _buffers if i not in alive]:
            del _buffers[ident]


def buffer_threads() -> list[int]:
    """Threads that hold reusable buffers."""
    with _buffers_guard:
        return [ident for ident, buffers in _buffers.items() if buffers]


def buffer_bytes(ident: int) -> int:
    """Host bytes of ``ident``'s reusable buffers (device buffers are not host memory)."""
    with _buffers_guard:
        buffers = list(_buffers.get(ident, {}).values())
    return sum(b.numel() * b.element_size() for b in buffers if b is not None and b.is_cpu)


def free_buffers(ident: int) -> None:
    """Drop ``ident``'s reusable buffers: only while that thread runs no task (the memory
    gate knows), or from the thread itself between tasks."""
    with _buffers_guard:
        _buffers.pop(ident, None)


_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def device_lock(device: torch.device) -> contextlib.AbstractContextManager:
    """Held around a task's device work: one kernel per GPU at a time in this process (a GPU
    worker owns one GPU, so per process is per GPU). CPU tasks run side by side: no lock."""
    if device.type == "cpu":
        return contextlib.nullcontext()
    name = str(device if device.index is not None else torch.device(device.type, 0))
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


# ---- pinned staging: one page-locked buffer per worker thread, sized once from the plan ----
# torch's pinned allocator rounds a block up to a power of two and caches freed blocks, so a
# buffer grown tensor by tensor (free, allocate larger) could hold about twice the pinned memory
# of its last size. Instead each thread allocates one byte buffer, at the size of the largest
# task of the plan (``reserve_staging``, called by the task with the size ``run_tasks`` passes
# it), and stages every tensor of every task into it, back to back.
STAGE_ALIGN = 64  # bytes: each staged tensor starts on a cache-line boundary


def staging_size(nbytes: Sequence[int]) -> int:
    """Bytes of pinned staging a task needs for tensors of ``nbytes`` bytes, staged together."""
    return sum(-(-n // STAGE_ALIGN) * STAGE_ALIGN for n in nbytes)


def _allocate_pinned(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked host memory (a seam: tests fake it without CUDA)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def reserve_staging(nbytes: int) -> torch.Tensor:
    """This thread's pinned staging buffer, at least ``nbytes`` long: allocated on the first
    call, at ``nbytes``, and kept for the thread's life. Called with the plan's largest size
    before any tensor is staged, so it is never regrown during a run; only a later run with
    a larger plan (a long-lived cluster worker) replaces it, once."""
    buf = getattr(_local, "pinned", None)
    if buf is None or buf.numel() < nbytes:
        _local.pinned = None  # free the smaller one first
        buf = _local.pinned = _allocate_pinned(nbytes)
    return buf


def stage(
    views: Sequence[torch.Tensor], device: torch.device, nbytes: int | None = None
) -> list[torch.Tensor]:
    """For a GPU task, copy mapped tensors back to back into this thread's pinned buffer
    (reserved at ``nbytes``, the plan's largest ``staging_size``; this task's own size when
    not given): this is the read (page faults from disk), done before ``device_lock`` so it
    overlaps another thread's kernel, and the later host → device copy is a fast DMA. On the
    CPU the mapped views themselves are returned: nothing to overlap, the bytes unchanged."""
    views = list(views)
    if device.type == "cpu" or all(v.numel() == 0 for v in views):
        return views
    sizes = [v.numel() * v.element_size() for v in views]
    buf = reserve_staging(max(nbytes or 0, staging_size(sizes)))
    staged, offset = [], 0
    for view, size in zip(views, sizes, strict=True):
        part = buf[offset : offset + size].view(view.dtype).view(view.shape)
        staged.append(part.copy_(view))
        offset += staging_size([size])
    return staged
