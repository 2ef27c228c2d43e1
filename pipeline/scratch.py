"""Per-thread buffers reused across tasks.

Filling fresh pages costs more than the arithmetic on them (page faults: ~1 GB/s into new
memory against 10+ GB/s into a reused buffer), so each worker thread keeps, per role, the
largest buffer it has needed and hands out views of it. Memory stays bounded by the largest
tensor per thread and role."""

from __future__ import annotations

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
