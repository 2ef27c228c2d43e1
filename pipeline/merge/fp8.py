"""The bytes of a merge task that involves scaled fp8 (plan.py ``plan_fp8``): a scaled-fp8 base
weight is dequantized (``W_fp8 · scale``) before the merge or cast, and an fp8 output is
quantized with a per-tensor (or per-row) scale, saturating, rounded to nearest.

A weight and its scale are two tasks (one output slot each, so resume vouches for each): both
compute the same fp32 value with the same operations on the same device kind, so the scale
written is the one the weight was quantized with."""

from __future__ import annotations

import math

import torch

from loraforge.stages.merge import merge_weight
from loraforge.stages.quantize import FP8_DTYPES, fp8_scale, quantize_fp8

from ..io import safetensors_format as stf
from ..io.reader import dequantized, mapped
from ..lora.patches import load_deltas
from ..run.clock import PhaseClock
from ..run.staging import device_lock, thread_buffer
from .checks import Carried, checked
from .plan import MergeTask


def is_fp8_task(task: MergeTask) -> bool:
    """Whether ``task`` needs this module: it dequantizes, quantizes or writes a scale or
    marker (a copy of stored bytes never does)."""
    if task.kind == "copied":
        return False
    return (
        task.part != "value"
        or task.base.scale is not None
        or stf.DTYPE_BY_CODE[task.out_dtype] in FP8_DTYPES
    )


def fp8_result(
    task: MergeTask,
    device: str,
    allow_nonfinite: bool = False,
    carried: Carried | None = None,
    clock: PhaseClock | None = None,
) -> torch.Tensor:
    """What ``task`` writes, on the CPU: the tensor in its output dtype, or its scale; each
    step charged to its phase on ``clock``."""
    clock = clock or PhaseClock()
    dtype = stf.DTYPE_BY_CODE[task.out_dtype]
    if task.part == "marker":  # its dtype is what it says; ComfyUI saves it empty
        return torch.zeros(task.entry.shape, dtype=dtype)
    if task.part == "scale" and not task.quantized:  # its weight keeps its fp8 bytes
        return torch.ones(task.entry.shape, dtype=dtype)
    dev = torch.device(device)
    with mapped(task.base) as view, device_lock(dev):
        out = thread_buffer(task.base.shape, torch.float32, dev, "merged")
        stored = view.to(dev)
        clock.lap("read")
        value = dequantized(task.base, stored, out)
        deltas = load_deltas(task.patches, dev, allow_nonfinite) if task.patches else ()
        value = merge_weight(value, deltas, out=out)
        clock.lap("product")
        # the fp32 value first: fp8 saturates, and a weight's scale is computed from it
        extremes = _extremes(value)
        checked(task, extremes, view, torch.float32, allow_nonfinite, carried)
        clock.lap("check")
        result = _encode(task, value, dtype)
        clock.lap("cast")
        if result.dtype not in FP8_DTYPES:  # the value cast, or its scale (fp32)
            checked(task, extremes.to(dtype), view, dtype, allow_nonfinite, carried)
            clock.lap("check")
        return result.cpu()


def _extremes(value: torch.Tensor) -> torch.Tensor:
    """The least and greatest of ``value`` (NaN where it holds one; an empty ``value`` as it
    is): finite exactly where ``value`` is, and, since rounding is monotonic, cast to a dtype
    finite exactly where ``value`` cast is (``io/finite.py casts_finite``). A scale is finite
    exactly where the value it is the amax of is, so one reduction serves both checks."""
    return torch.stack(torch.aminmax(value)) if value.numel() else value


def _encode(task: MergeTask, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not task.quantized:
        if dtype in FP8_DTYPES:  # an fp8 tensor without a scale: saturating, scale 1
            return quantize_fp8(value, dtype, torch.ones((), device=value.device))[0]
        return value.to(dtype)
    fp8 = torch.float8_e4m3fn if task.part == "scale" else dtype
    scale = fp8_scale(value, fp8, per_row=_per_row(task))
    if task.part == "scale":
        return scale.reshape(task.entry.shape)
    return quantize_fp8(value, fp8, scale)[0]


def _per_row(task: MergeTask) -> bool:
    """A base weight scaled per row keeps per-row scales (LightX2V's ``[out, 1]``)."""
    scale = task.base.scale
    return scale is not None and math.prod(scale.shape) > 1
