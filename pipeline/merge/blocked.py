"""Merge tasks sized against the memory budget, and the blocked merge of a tensor larger than
it: ``W + Σ factorᵢ·upᵢ·downᵢ (+ factor·diff)`` a block of rows at a time (the rows of the
product are the same rows of ``up`` times all of ``down``), each block cast and written at its
place in the output slot, so only one block is ever in memory."""

from __future__ import annotations

import math

import torch

from loraforge.stages.cast import cast, needs_cast
from loraforge.stages.merge import Delta, merge_weight, with_fp32_down
from loraforge.stages.quantize import FP8_DTYPES, dequantize, scale_rows

from ..io import safetensors_format as stf
from ..io.layout import Slot
from ..io.maps import prefault, release
from ..io.reader import load_tensor, mapped
from ..io.slots import RowWriter
from ..io.stream import StreamedSlot
from ..lora.patches import load_deltas
from ..run.clock import PhaseClock
from ..run.device import usable_device_memory
from ..run.staging import thread_buffer
from .checks import Carried, checked
from .fp8 import is_fp8_task
from .plan import MergeTask

SLACK = 32 * 2**20  # torch's own allocations, the LoRA factors' small copies
BLOCK_TARGET = 256 * 2**20  # bytes of block buffers
# fp32 bytes of a streamed CPU block (cache_block_rows): about a core's L2 (2 MB here), where
# rank-32 products of 1536x8960 weights ran 1.35x the whole tensor's speed, two cores at once
CACHE_BLOCK = 2 * 2**20


FP8_BYTES = 9  # an fp8 task (fp8.py, whole tensors): fp32 buffer, fp32 scaled copy, fp8 result


def can_block(task: MergeTask) -> bool:
    """Whether ``task`` can run in row blocks: every task but those that write fp8 or a scale
    (a per-tensor scale needs the whole merged tensor first). A scaled-fp8 base merged or cast
    into bf16/fp16/fp32 is dequantized block by block (its scale's rows)."""
    if task.kind == "copied" or not task.base.shape:
        return False
    return not is_fp8_task(task) or (
        task.part == "value" and stf.DTYPE_BY_CODE[task.out_dtype] not in FP8_DTYPES
    )


def _bytes_per_element(task: MergeTask) -> int:
    """Host bytes a task allocates per element: the fp32 buffer of a merged or dequantized
    tensor, and the cast result when the output dtype differs (a copied tensor is written from
    the map)."""
    out = stf.itemsize(task.out_dtype)
    if is_fp8_task(task):
        return 4 + out if can_block(task) else FP8_BYTES
    if task.kind == "merged":
        return 4 + out
    return out if task.kind == "cast" else 0


def working_bytes(task: MergeTask) -> int:
    return _bytes_per_element(task) * task.base.numel + SLACK


def block_rows_for(task: MergeTask, budget: int) -> int | None:
    """Rows per block when ``task`` does not fit ``budget`` whole (None when it does, and for
    tasks that cannot run in blocks: ``can_block``)."""
    if working_bytes(task) <= budget or not can_block(task):
        return None
    row = _bytes_per_element(task) * math.prod(task.base.shape[1:])
    block = min(BLOCK_TARGET, max((budget - SLACK) // 2, 0))
    return max(1, min(task.base.shape[0], block // max(row, 1)))


def device_block_rows(task: MergeTask, device: torch.device) -> int | None:
    """On a GPU: rows per block when a merged tensor does not fit the device's free memory
    whole, so a tensor larger than the GPU streams through it (None when it fits)."""
    if task.kind != "merged":
        return None
    return block_rows_for(task, usable_device_memory(device))


def blocked_bytes(task: MergeTask, block_rows: int) -> int:
    return _bytes_per_element(task) * block_rows * math.prod(task.base.shape[1:]) + SLACK


def _rows(delta: Delta, start: int, stop: int) -> Delta:
    if delta.diff is not None:
        return Delta(delta.factor, diff=delta.diff[start:stop])
    return Delta(delta.factor, up=delta.up[start:stop], down=delta.down)


def cache_block_rows(task: MergeTask) -> int:
    """Rows per block of a CPU merge streamed to its slot: an fp32 block of ~``CACHE_BLOCK``
    bytes stays in a core's cache from the upcast through the product and the cast."""
    row = 4 * math.prod(task.base.shape[1:])
    return max(1, min(task.base.shape[0], CACHE_BLOCK // max(row, 1)))


def merge_blocked(
    task: MergeTask,
    slot: Slot,
    device: torch.device,
    dtype: torch.dtype,
    block_rows: int,
    allow_nonfinite: bool,
    carried: Carried | None = None,
    clock: PhaseClock | None = None,
    streamed: bool = False,
    write_behind: bool = False,
) -> int:
    """Merge (or cast) ``task`` into ``slot`` in blocks of ``block_rows`` rows on ``device``,
    charging each step to its phase on ``clock``; return the checksum of the bytes written
    (CRC-32C, CRC-32 in a zip record: ``io/slots.py checksum``).

    Each block is written as it is made (``RowWriter``): only one block is ever in memory, and
    a block's rows are read from the map as the product or cast first touches them, so
    ``read`` holds only the LoRA factors. ``streamed`` (CPU): the blocks are made in place in
    the whole result's buffer, which goes to the disk behind them (``io/stream.py``), and the
    base's pages are faulted in first; with ``write_behind`` this returns before the disk has
    them all (``StreamedSlot``: the run then calls ``finish_writes``), and ``wait`` is the time
    spent waiting for a buffer the disk had not finished with."""
    clock = clock or PhaseClock()
    sink = StreamedSlot(slot, dtype, write_behind) if streamed else RowWriter(slot)
    if streamed:
        clock.lap("wait")  # for a buffer the disk has finished with: the disk is behind
    with sink as writer:
        deltas = list(load_deltas(task.patches, device, allow_nonfinite))
        scale = load_tensor(task.base.scale) if task.base.scale is not None else None
        with mapped(task.base) as view:
            _merge_rows(
                task, view, deltas, scale, writer, device, dtype, block_rows,
                allow_nonfinite, carried, clock, streamed,
            )  # fmt: skip
        checksum = writer.close()
        clock.lap("write")
        return checksum


def _merge_rows(
    task: MergeTask,
    view: torch.Tensor,
    deltas: list[Delta],
    scale: torch.Tensor | None,
    writer: RowWriter | StreamedSlot,
    device: torch.device,
    dtype: torch.dtype,
    block_rows: int,
    allow_nonfinite: bool,
    carried: Carried | None,
    clock: PhaseClock,
    streamed: bool,
) -> None:
    """``merge_blocked``'s loop: each block of ``view``'s rows merged (or dequantized), cast,
    checked and handed to ``writer``."""
    if streamed:
        prefault(view)
    deltas = [with_fp32_down(d) for d in deltas]
    computes = task.kind == "merged" or scale is not None
    in_place = streamed and dtype == torch.float32  # the merged rows are the result
    scratch = None
    if computes and not in_place:  # one block's fp32 rows, reused block after block
        block_shape = (min(block_rows, view.shape[0]), *view.shape[1:])
        scratch = thread_buffer(block_shape, torch.float32, device, "merged")
    for start in range(0, view.shape[0], block_rows):
        stop = min(start + block_rows, view.shape[0])
        rows = view[start:stop]
        dest = writer.destination(start, stop)
        value = rows.to(device)
        clock.lap("read")
        if computes:
            out = dest if in_place else scratch[: stop - start]
            if scale is not None:  # W_fp8 · scale, as fp8.py reads a scaled weight
                value = dequantize(value, scale_rows(scale, start, stop), out=out)
            if task.kind == "merged":
                value = merge_weight(value, [_rows(d, start, stop) for d in deltas], out=out)
            clock.lap("product")
        buffer = dest
        if buffer is None and needs_cast(value, dtype):
            buffer = thread_buffer(tuple(rows.shape), dtype, device, "cast")
        result = cast(value, dtype, out=buffer)
        if dest is not None and result.data_ptr() != dest.data_ptr():
            result = dest.copy_(result)  # made elsewhere (cast needed none)
        clock.lap("cast")
        result = checked(task, result, rows, dtype, allow_nonfinite, carried)
        clock.lap("check")
        writer.write(result)
        if not streamed:  # (a streamed tensor's pages go at the end, all at once)
            release(rows)
            for d in deltas:
                if d.diff is not None:
                    release(d.diff[start:stop])
        clock.lap("write")
