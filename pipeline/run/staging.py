"""Inside a task: per-thread buffers reused across tasks, and, for GPU tasks, the per-device
lock and pinned host staging that overlap one thread's read with another's kernel (the design
is in ``gpu.py``).

Filling fresh pages costs more than the arithmetic on them (page faults: ~1 GB/s into new
memory against 10+ GB/s into a reused buffer), so each worker thread keeps, per role, the
largest buffer it has needed and hands out views of it. Memory stays bounded by the largest
tensor per thread and role."""

from __future__ import annotations

import contextlib
import math
import threading

import torch

_local = threading.local()


def thread_buffer(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
    role: str,
    *,
    pinned: bool = False,
) -> torch.Tensor:
    """An uninitialised ``shape`` view of this thread's ``role`` buffer (``pinned``: page-locked
    host memory, for fast copies to a GPU). Two views of one role alias each other: give each
    live buffer its own role."""
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = (role, dtype, torch.device(device), pinned)
    numel = math.prod(shape)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        buffers[key] = None  # free the smaller one first
        buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device, pin_memory=pinned)
    return buf[:numel].view(shape)


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


def stage(view: torch.Tensor, slot: str, device: torch.device) -> torch.Tensor:
    """For a GPU task, copy a mapped tensor into this thread's pinned host buffer ``slot``:
    this is the read (page faults from disk), done before ``device_lock`` so it overlaps
    another thread's kernel, and the later host → device copy is a fast DMA. On the CPU the
    mapped view itself is returned: nothing to overlap."""
    if device.type == "cpu" or view.numel() == 0:
        return view
    staged = thread_buffer(tuple(view.shape), view.dtype, "cpu", f"stage-{slot}", pinned=True)
    return staged.copy_(view)
