"""What one Dask task of a merge does to one base tensor: read it and the LoRA tensors that patch
it by memory map, merge in fp32 (stage ``merge``), cast to the output dtype, write the bytes at
the tensor's planned offset in the temporary output (synced), then write its completion marker.
Tensors never leave the task; a small dict travels back."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch

from loraforge.stages.cast import cast, needs_cast
from loraforge.stages.merge import Delta, merge_weight

from ..errors import NonFiniteTensor
from ..io import safetensors_format as stf
from ..io.layout import Slot
from ..io.reader import TensorInfo, load_tensor, mapped
from ..io.slots import write_at
from ..run.staging import device_lock, stage, thread_buffer
from ..workdir import WorkDir
from .plan import MergeTask, PatchRef


def _finite(tensor: torch.Tensor, info: TensorInfo, allow: bool) -> None:
    if not allow and not bool(torch.isfinite(tensor).all()):
        raise NonFiniteTensor(
            "holds NaN or Inf",
            path=info.file,
            key=info.key,
            hint="fix the LoRA, or pass --allow-nonfinite to merge it anyway",
        )


def _deltas(patches: tuple[PatchRef, ...], dev: torch.device, allow: bool) -> Iterator[Delta]:
    """Each patch's tensors, loaded only when the stage asks for them."""
    for patch in patches:
        if patch.diff is not None:
            with mapped(patch.diff) as diff:
                _finite(diff, patch.diff, allow)
                yield Delta(patch.factor, diff=diff.to(dev))
            continue
        up, down = load_tensor(patch.up), load_tensor(patch.down)
        _finite(up, patch.up, allow)
        _finite(down, patch.down, allow)
        yield Delta(patch.factor, up=up.to(dev), down=down.to(dev))


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``cast`` stage into this thread's buffer instead of fresh memory."""
    out = None
    if needs_cast(tensor, dtype):
        out = thread_buffer(tuple(tensor.shape), dtype, tensor.device, "cast")
    return cast(tensor, dtype, out=out)


def run_merge_task(
    task: MergeTask,
    slot: Slot,
    work_dir: str,
    device: str,
    stamp: dict,
    allow_nonfinite: bool = False,
) -> dict:
    """Merge or cast one tensor into its slot; return the completion marker (also written to
    ``work_dir`` once the bytes are written). ``stamp`` is the plan's fingerprint."""
    start = time.perf_counter()
    dtype = stf.DTYPE_BY_CODE[task.out_dtype]
    with mapped(task.base) as view:
        if task.kind != "merged":
            checksum = write_at(slot, _cast(view, dtype))
        else:
            dev = torch.device(device)
            # GPU: read the base into pinned memory, then hold the device for the merge, the
            # cast and the copy back (run/gpu.py); LoRA factors are small, read inside.
            base = stage(view, "base", dev)
            with device_lock(dev):
                out = thread_buffer(task.base.shape, torch.float32, dev, "merged")
                merged = merge_weight(
                    base.to(dev), _deltas(task.patches, dev, allow_nonfinite), out=out
                )
                if dev.type != "cpu":
                    on_device = _cast(merged, dtype)
                    merged = thread_buffer(task.base.shape, on_device.dtype, "cpu", "result")
                    merged.copy_(on_device)
    if task.kind == "merged":
        checksum = write_at(slot, _cast(merged, dtype))
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
    WorkDir(work_dir).write_marker(task.key, marker)
    return marker
