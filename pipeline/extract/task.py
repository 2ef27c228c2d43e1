"""What one Dask task does to one tensor. Tasks receive addresses (plan entries holding file
paths and keys) and open the checkpoints themselves; only small dicts travel back."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch

from loraforge.stages.diff import is_unchanged, max_abs, weight_delta
from loraforge.stages.lowrank import lowrank

from ..io.fingerprint import file_stat, tensor_crc32c
from ..io.reader import dequantized, load_weight, mapped
from ..run.staging import device_lock, stage, staging_size, thread_buffer
from ..workdir import WorkDir
from .blocked import device_block_rows, run_blocked
from .options import KernelOptions
from .plan import ExtractTask
from .result import lowrank_result, nonfinite
from .resume import SIDES, read_record


def _delta(
    task: ExtractTask, device: torch.device, base: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The fp32 delta of the read tensors (in this thread's buffer) and its max |entry|."""
    out = thread_buffer(task.shape, torch.float32, device, "delta")
    if device.type != "cpu":
        base, target = base.to(device), target.to(device)
    scratch = thread_buffer(task.shape, torch.float32, device, "base")
    # A scaled-fp8 side is W_fp8 · scale (io/fp8.py), dequantized into the buffers first.
    base, target = dequantized(task.source, base, scratch), dequantized(task.target, target, out)
    delta = weight_delta(base, target, out=out, scratch=scratch)
    largest = max_abs(delta)
    if not math.isfinite(largest):
        raise nonfinite(task, math.isfinite(max_abs(load_weight(task.target))))
    return delta, largest


def stage_bytes(task: ExtractTask) -> int:
    """Pinned staging a GPU task of ``task`` needs (both tensors, stored dtype). ``run_tasks``
    passes the largest over the plan to every GPU task as ``stage_nbytes``."""
    return staging_size([task.source.nbytes, task.target.nbytes])


@contextmanager
def _read(task: ExtractTask, device: torch.device, read: dict, stage_nbytes: int | None = None):
    """Both tensors, read: the mapped views on the CPU (the diff reads them), copies in pinned
    host memory for a GPU task, made here so the read overlaps another thread's kernel.

    ``read`` gains, per side, the file's stat taken before the read and the CRC-32C of the
    bytes the diff uses (hashed from the mapped view, or from the pinned copy). ``stage_nbytes``:
    the pinned staging this thread reserves once (the plan's largest task)."""
    before = {side: file_stat(getattr(task, side).file) for side in SIDES}
    with mapped(task.source) as base, mapped(task.target) as target:
        if device.type != "cpu":
            base, target = stage([base, target], device, stage_nbytes)
        read["source"] = before["source"], tensor_crc32c(base)
        read["target"] = before["target"], tensor_crc32c(target)
        if device.type == "cpu":
            yield base, target
            return
    yield base, target


def run_extract_task(
    task: ExtractTask,
    work_dir: str,
    device: str,
    kernel: KernelOptions,
    fingerprint: dict,
    block_rows: int | None = None,
    stage_nbytes: int | None = None,
) -> dict:
    """Diff, factor or keep, and store one tensor's fp32 result in the work directory.
    ``block_rows``: read the delta in blocks of that many rows, never whole (blocked.py).
    ``stage_nbytes`` (GPU only): the pinned staging to reserve, the plan's largest
    ``stage_bytes``, so this thread's buffer is allocated once (default: this task's own).

    Returns the completion marker (also written to disk after the arrays)."""
    start = time.perf_counter()
    dev = torch.device(device)
    # MKL's QR and GEMM round differently with different thread counts; one thread per task
    # keeps the bytes independent of --workers and of the machine's core count (parallelism
    # comes from running tasks side by side).
    torch.set_num_threads(1)
    marker = {"key": task.key, "fingerprint": fingerprint, "shape": list(task.shape)}
    # Read first, then hold the device for diff, kernel and the copy back: one kernel per GPU
    # at a time while another thread reads (see run/gpu.py); the save comes after.
    read = {}
    if block_rows is None and dev.type == "cuda":
        block_rows = device_block_rows(task, kernel, dev)
    if block_rows is not None:
        work = WorkDir(work_dir)
        arrays, attributes = run_blocked(task, dev, kernel, block_rows, marker, read, work)
    else:
        with _read(task, dev, read, stage_nbytes) as (base, target), device_lock(dev):
            arrays, attributes = _factor(task, dev, kernel, base, target, marker)
    # A file that changed between the stat and now is not vouched for: a resume recomputes.
    marker["inputs"] = {
        side: read_record(*read[side], file_stat(getattr(task, side).file)) for side in SIDES
    }
    marker["seconds"] = round(time.perf_counter() - start, 4)
    if arrays is None:  # a blocked diff, stored block by block: only the marker is left
        WorkDir(work_dir).write_marker(task.key, marker)
        return marker
    marker["array_shapes"] = {name: list(a.shape) for name, a in arrays.items()}
    WorkDir(work_dir).save(task.key, arrays, marker, attributes)
    return marker


def _factor(
    task: ExtractTask,
    dev: torch.device,
    kernel: KernelOptions,
    base: torch.Tensor,
    target: torch.Tensor,
    marker: dict,
) -> tuple[dict, dict]:
    """Diff and factor (or keep) one tensor; ``marker`` gains what was done. Returns the
    arrays to store, on the host, and their zarr attributes."""
    delta, largest = _delta(task, dev, base, target)
    arrays, attributes = {}, {}
    if is_unchanged(largest):
        marker["kind"] = "unchanged"
    elif task.kind == "lowrank":
        factors = lowrank(
            delta,
            task.rank,
            name=task.key,
            method=kernel.method,
            settings=kernel,
            scratch=lambda shape, dtype: thread_buffer(shape, dtype, dev, "sketch"),
        )
        arrays, attributes = lowrank_result(factors, kernel, marker)
    else:
        arrays = {"diff": delta}
        marker.update(kind="diff")
    del delta
    return {name: a.cpu().numpy() for name, a in arrays.items()}, attributes
