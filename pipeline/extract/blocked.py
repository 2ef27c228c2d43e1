"""Extraction of a tensor larger than the memory budget: the delta is never materialised whole.

``RowBlocks`` (kernels/blocked.py) reads ``target − base`` a block of rows at a time from the
memory maps for each pass of the randomized SVD; the read pages are dropped after each block,
and the fp32 block lives in this thread's reusable buffer. Memory is the SVD's O((m + n)·q)
plus one block, whatever the tensor's size. A diff is stored the same way, one zarr chunk per
block. The first pass also hashes the bytes read (CRC-32C per side, chained block by block),
as an unblocked task hashes its whole views."""

from __future__ import annotations

import math

import torch

from loraforge.kernels import RowBlocks, sketch_dtype
from loraforge.stages.diff import is_unchanged, max_abs, weight_delta
from loraforge.stages.lowrank import lowrank_blocked
from loraforge.stages.quantize import dequantize, scale_rows

from ..io.fingerprint import file_stat, tensor_crc32c
from ..io.maps import release
from ..io.reader import load_tensor, mapped
from ..run.device import usable_device_memory
from ..run.staging import device_lock, thread_buffer
from ..workdir import WorkDir
from .options import KernelOptions
from .plan import ExtractTask
from .result import lowrank_result, nonfinite
from .resume import SIDES

SLACK = 32 * 2**20  # kernel workspaces (QR, SVD of the small matrix), torch's own allocations
BLOCK_TARGET = 256 * 2**20  # rows per block: up to this many bytes of fp32 block buffers


def sketch_width(task: ExtractTask, kernel: KernelOptions) -> int:
    return min(task.rank + kernel.oversample, *task.shape[:2])


def svd_bytes(m: int, n: int, q: int) -> int:
    """The randomized SVD's own fp32 state: the m×q and n×q bases and their products, the
    q×n projection and its SVD (a few of each alive at once)."""
    return 4 * q * 3 * (m + n) + 4 * 3 * q * q


def working_bytes(task: ExtractTask, kernel: KernelOptions, device: str = "cpu") -> int:
    """Memory an unblocked task allocates on ``device``: the fp32 delta and the upcast base (8
    bytes an element), plus, for a low-rank one, the delta's bf16 copy when the SVD sketches in
    bf16 there and the SVD's state."""
    elements = math.prod(task.shape)
    if task.kind != "lowrank":
        return 8 * elements + SLACK
    m, n = task.shape
    low = sketch_dtype(kernel.sketch, device)
    lowered = 0 if low == torch.float32 else low.itemsize * elements
    return 8 * elements + lowered + svd_bytes(m, n, sketch_width(task, kernel)) + SLACK


def _fixed_bytes(task: ExtractTask, kernel: KernelOptions) -> int:
    """What a blocked task holds whatever its block size: the SVD's state, the slack."""
    if task.kind != "lowrank":
        return SLACK
    m, n = task.shape
    return svd_bytes(m, n, sketch_width(task, kernel)) + SLACK


def block_rows_for(
    task: ExtractTask, kernel: KernelOptions, budget: int, device: str = "cpu"
) -> int | None:
    """Rows per block when ``task`` does not fit ``budget`` whole on ``device`` (None when it
    does): blocks of at most ``BLOCK_TARGET`` bytes of buffers (fp32 delta and upcast base),
    smaller when the budget is tight, at least one row."""
    if not task.shape or working_bytes(task, kernel, device) <= budget:
        return None
    row = 8 * math.prod(task.shape[1:])
    block = min(BLOCK_TARGET, max((budget - _fixed_bytes(task, kernel)) // 2, 0))
    return max(1, min(task.shape[0], block // max(row, 1)))


def device_block_rows(task: ExtractTask, kernel: KernelOptions, device: torch.device) -> int | None:
    """On a GPU: rows per block when the task does not fit the device's free memory whole,
    so a tensor larger than the GPU streams through it (None when it fits)."""
    if task.kind != "lowrank":
        return None
    return block_rows_for(task, kernel, usable_device_memory(device), str(device))


def blocked_bytes(task: ExtractTask, kernel: KernelOptions, block_rows: int) -> int:
    return 8 * block_rows * math.prod(task.shape[1:]) + _fixed_bytes(task, kernel)


class _Reader:
    """``target − base`` rows for ``RowBlocks``, hashing what the first pass reads; a
    scaled-fp8 side is dequantized row block by row block (its scale's rows)."""

    def __init__(self, task: ExtractTask, base: torch.Tensor, target: torch.Tensor, device):
        self.base, self.target, self.device = base, target, device
        self.scales = {
            side: None if info.scale is None else load_tensor(info.scale)
            for side, info in (("source", task.source), ("target", task.target))
        }
        self.crc = {"source": None, "target": None}
        self._hashed_to = 0  # rows hashed so far, in order, by the first pass

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        base, target = self.base[start:stop], self.target[start:stop]
        if start == self._hashed_to:
            self.crc["source"] = tensor_crc32c(base, self.crc["source"])
            self.crc["target"] = tensor_crc32c(target, self.crc["target"])
            self._hashed_to = stop
        shape = tuple(base.shape)
        out = thread_buffer(shape, torch.float32, self.device, "delta")
        scratch = thread_buffer(shape, torch.float32, self.device, "base")
        sides = []
        for side, rows, buffer in (("source", base, scratch), ("target", target, out)):
            rows = rows.to(self.device)
            if self.scales[side] is not None:
                rows = dequantize(rows, scale_rows(self.scales[side], start, stop), out=buffer)
            sides.append(rows)
        delta = weight_delta(*sides, out=out, scratch=scratch)
        release(base)
        release(target)
        return delta


def run_blocked(
    task: ExtractTask,
    dev: torch.device,
    kernel: KernelOptions,
    block_rows: int,
    marker: dict,
    read: dict,
    work: WorkDir,
) -> tuple[dict | None, dict]:
    """The task's result with the delta read ``block_rows`` rows at a time: low-rank factors
    (returned, to be stored), or a diff stored chunk by chunk in ``work`` as it is made
    (returns None: only the marker is left to write). ``read`` gains each side's stat and the
    CRC-32C of its bytes, hashed by the first pass."""
    before = {side: file_stat(getattr(task, side).file) for side in SIDES}
    with mapped(task.source) as base, mapped(task.target) as target, device_lock(dev):
        reader = _Reader(task, base, target, dev)
        op = RowBlocks(reader, tuple(base.shape), block_rows, dev)
        if task.kind == "lowrank":
            largest = op.max_abs()  # the first pass: also ‖A‖² and the CRCs
        else:
            largest = _store_diff(op, work.row_writer(task.key, "diff", task.shape, block_rows))
        for side in SIDES:
            read[side] = before[side], reader.crc[side]
        if not math.isfinite(largest):
            raise nonfinite(task, not _has_nonfinite(target, block_rows))
        marker["blocked"] = {"block_rows": block_rows, "blocks": op.blocks}
        if is_unchanged(largest):
            marker["kind"] = "unchanged"
            return ({}, {}) if task.kind == "lowrank" else (None, {})
        if task.kind != "lowrank":
            marker.update(kind="diff", arrays=["diff"], array_shapes={"diff": list(task.shape)})
            return None, {}
        arrays, attributes = lowrank_result(factor_blocked(op, task, kernel), kernel, marker)
        marker["blocked"]["passes"] = op.passes
    return {name: a.cpu().numpy() for name, a in arrays.items()}, attributes


def _store_diff(op: RowBlocks, writer) -> float:
    """Each block of the delta into ``writer`` (one zarr chunk per block); max |entry|."""
    largest = 0.0
    for start in range(0, op.shape[0], op.block_rows):
        delta = op.read(start, min(start + op.block_rows, op.shape[0]))
        largest = max(largest, max_abs(delta)) if not math.isnan(largest) else largest
        writer.write(delta.cpu().numpy())
    if math.isfinite(largest):
        writer.close()
    return largest


def _has_nonfinite(view: torch.Tensor, block_rows: int) -> bool:
    return any(
        not bool(torch.isfinite(view[i : i + block_rows].float()).all())
        for i in range(0, view.shape[0], block_rows)
    )


def factor_blocked(op: RowBlocks, task: ExtractTask, kernel: KernelOptions):
    """The low-rank factors of ``op``'s delta (randomized SVD, whatever ``kernel.method``:
    an exact SVD needs the whole delta)."""
    return lowrank_blocked(op, task.rank, name=task.key, settings=kernel)
