"""What one Dask task of a merge does to one base tensor: read it and the LoRA tensors that patch
it by memory map, merge in fp32 (stage ``merge``), cast to the output dtype, write the bytes at
the tensor's planned offset in the temporary output, then write its completion marker. On the
CPU this runs in cache-sized row blocks made in place in the buffer the bytes are written from,
the disk writing behind them (``blocked.py``, ``io/stream.py``). Tensors never leave the task;
a small dict travels back."""

from __future__ import annotations

import os
import time

import torch

from loraforge.stages.cast import cast, needs_cast
from loraforge.stages.merge import merge_weight

from ..io import safetensors_format as stf
from ..io.direct import aligned_tensor
from ..io.layout import Slot
from ..io.maps import prefault
from ..io.reader import mapped
from ..io.slots import write_at
from ..lora.patches import load_deltas
from ..run.clock import PhaseClock
from ..run.staging import device_lock, stage, staging_size, thread_buffer
from ..workdir import WorkDir
from .blocked import cache_block_rows, can_block, device_block_rows, merge_blocked
from .checks import Carried, checked
from .fp8 import fp8_result, is_fp8_task
from .plan import MergeTask


def _cast(tensor: torch.Tensor, dtype: torch.dtype, slot: Slot | None = None) -> torch.Tensor:
    """The ``cast`` stage into this thread's buffer instead of fresh memory; on the CPU with the
    ``slot`` it goes to, placed for a direct write from where it is (``io/direct.py``)."""
    out = None
    if needs_cast(tensor, dtype):
        shape = tuple(tensor.shape)
        if slot is not None and tensor.device.type == "cpu":
            out = aligned_tensor(shape, dtype, slot.offset)
        else:
            out = thread_buffer(shape, dtype, tensor.device, "cast")
    return cast(tensor, dtype, out=out)


def stage_bytes(task: MergeTask) -> int:
    """Pinned staging a GPU task of ``task`` needs: the base tensor of a merged one (cast and
    copied tensors are not staged). ``run_tasks`` passes the plan's largest as
    ``stage_nbytes``."""
    return staging_size([task.base.nbytes]) if task.kind == "merged" else 0


def run_merge_task(
    task: MergeTask,
    slot: Slot,
    work_dir: str,
    device: str,
    stamp: dict,
    allow_nonfinite: bool = False,
    block_rows: int | None = None,
    stage_nbytes: int | None = None,
    write_behind: bool = False,
) -> dict:
    """Merge or cast one tensor into its slot; return the completion marker (also written to
    ``work_dir`` once the bytes are written, or with ``write_behind`` handed to the writer: a
    resume trusts a marker only while the bytes at its slot have its CRC). ``stamp`` is the
    plan's fingerprint; ``block_rows``: merge a block of that many rows at a time
    (blocked.py) through the page cache, never the whole; ``stage_nbytes`` (GPU only) the
    pinned staging to reserve, the plan's largest ``stage_bytes`` (default: this task's own);
    ``write_behind`` (a run in this process): a CPU task may return before its last bytes are
    on the disk, the run calling ``finish_writes`` before it commits (``io/stream.py``)."""
    start = time.perf_counter()
    clock = PhaseClock()
    dtype = stf.DTYPE_BY_CODE[task.out_dtype]
    carried = Carried()
    dev = torch.device(device)
    if block_rows is None and dev.type == "cuda":
        block_rows = device_block_rows(task, dev)
    if block_rows is not None:
        with device_lock(dev):
            checksum = merge_blocked(
                task, slot, dev, dtype, block_rows, allow_nonfinite, carried, clock
            )
        return _finish(task, slot, work_dir, stamp, checksum, start, block_rows, carried, clock)
    if dev.type == "cpu" and can_block(task) and not is_fp8_task(task):
        torch.set_num_threads(1)  # one core per task: the tasks run side by side
        rows = cache_block_rows(task)
        checksum = merge_blocked(
            task, slot, dev, dtype, rows, allow_nonfinite, carried, clock, True, write_behind
        )
        return _finish(task, slot, work_dir, stamp, checksum, start, carried=carried, clock=clock)
    if is_fp8_task(task):  # scaled fp8 read or written (fp8.py)
        result = fp8_result(task, device, allow_nonfinite, carried, clock)
        checksum = write_at(slot, result)
        clock.lap("write")  # with the copy back from the device
        return _finish(task, slot, work_dir, stamp, checksum, start, carried=carried, clock=clock)
    with mapped(task.base) as view:
        prefault(view)
        clock.lap("read")
        value = view  # a tensor no LoRA touches: cast (or kept) as stored
        if task.kind == "merged":
            value = _merged(task, view, torch.device(device), dtype, allow_nonfinite, stage_nbytes)
            clock.lap("product")
        result = _cast(value, dtype, slot)
        clock.lap("cast")
        result = checked(task, result, view, dtype, allow_nonfinite, carried)
        clock.lap("check")
        checksum = write_at(slot, result)
        clock.lap("write")
    return _finish(task, slot, work_dir, stamp, checksum, start, carried=carried, clock=clock)


def _merged(
    task: MergeTask,
    view: torch.Tensor,
    dev: torch.device,
    dtype: torch.dtype,
    allow_nonfinite: bool,
    stage_nbytes: int | None,
) -> torch.Tensor:
    """The base ``view`` plus the task's LoRA products, in this thread's buffer on the host:
    fp32 on the CPU (only a 0-d tensor comes here: the others run in blocks, ``blocked.py``);
    cast to ``dtype`` on a GPU before the copy back (then ``_cast`` is a no-op).
    GPU: the base is read into pinned memory, then the device is held for the merge, the cast
    and the copy back (run/gpu.py); LoRA factors are small, read inside."""
    (base,) = stage([view], dev, stage_nbytes)
    with device_lock(dev):
        out = thread_buffer(tuple(task.base.shape), torch.float32, dev, "merged")
        deltas = load_deltas(task.patches, dev, allow_nonfinite)
        merged = merge_weight(base.to(dev), deltas, out=out)
        if dev.type == "cpu":
            return merged
        on_device = _cast(merged, dtype)
        result = thread_buffer(task.base.shape, on_device.dtype, "cpu", "result")
        return result.copy_(on_device)


def _finish(
    task: MergeTask,
    slot: Slot,
    work_dir: str,
    stamp: dict,
    checksum: int,
    start: float,
    block_rows: int | None = None,
    carried: Carried | None = None,
    clock: PhaseClock | None = None,
) -> dict:
    """Write and return the completion marker of a task whose bytes are written, with the
    seconds it spent per phase (``clock``)."""
    marker = {
        **stamp,
        "key": task.key,
        "kind": task.kind,
        "file": os.path.basename(slot.file),
        "offset": slot.offset,
        "nbytes": slot.entry.nbytes,
        "crc": checksum,
        "seconds": round(time.perf_counter() - start, 4),
    }
    if block_rows is not None:
        blocks = -(-task.base.shape[0] // block_rows)
        marker["blocked"] = {"block_rows": block_rows, "blocks": blocks}
    if carried is not None and carried.why:  # written holding NaN or Inf (checks.py)
        marker["nonfinite"] = carried.why
    if clock is not None:
        marker["phases"] = clock.rounded()
    WorkDir(work_dir).write_marker(task.key, marker)
    return marker
