"""The rule every write follows: a tensor loraforge computed is checked finite as it is cast to
its output dtype, before its bytes are written, so no run reports success after writing NaN or
Inf. Used by the LoRA writes (``export/write.py``), the merge tasks (``merge/``) and the Python
API (``apply/``).

The check is one ``torch.aminmax`` over the cast result: a reduction at memory speed with no
temporary the size of the tensor (``isfinite().all()`` is ~40× slower and allocates a mask);
NaN propagates into it and ±Inf is its own extreme."""

from __future__ import annotations

import math

import torch

from ..errors import NonFiniteOutput

NAMES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite (non-float tensors always are)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    if tensor.dtype not in NAMES:  # fp8: no aminmax kernel; exact upcast
        tensor = tensor.float()
    low, high = torch.aminmax(tensor)  # NaN anywhere comes out as an extreme
    return math.isfinite(low.item()) and math.isfinite(high.item())


def casts_finite(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``tensor`` (finite or not) is finite once cast to ``dtype``, without the cast:
    rounding is monotonic, so the extremes tell (for a caller that casts as it copies)."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    extremes = torch.stack(torch.aminmax(tensor)).to(dtype)
    return bool(torch.isfinite(extremes.float()).all())


def dtype_range(dtype: torch.dtype) -> str:
    """``fp16 (largest finite value ±65504)``."""
    name = NAMES.get(dtype, str(dtype).removeprefix("torch."))
    return f"{name} (largest finite value ±{torch.finfo(dtype).max:.5g})"


def wider_dtypes(dtype: torch.dtype) -> str:
    """``--output-dtype`` values that reach further than ``dtype``, for a hint ("" if none)."""
    if torch.finfo(dtype).max >= torch.finfo(torch.bfloat16).max:
        return ""
    return "bf16 or fp32, which reach ±3.4e+38"


def check_written(
    tensor: torch.Tensor,
    *,
    key: str,
    made_from: str,
    fix: str | None,
    dtype: torch.dtype | None = None,
    path: str | None = None,
) -> None:
    """Refuse ``tensor`` (``key``, about to be written as ``dtype``, default its own) unless it
    is finite: one line naming it, ``made_from`` (the inputs, strengths and scales that
    produced it), the dtype's range, and ``fix``."""
    if is_finite(tensor):
        return
    dtype = dtype or tensor.dtype
    raise NonFiniteOutput(
        f"would be written holding NaN or Inf as {dtype_range(dtype)}; made from {made_from}",
        path=path,
        key=key,
        hint=fix,
    )


def output_fix(dtype: torch.dtype, knob: str | None) -> str:
    """What to do about a non-finite output: ``knob`` (e.g. "lower --strength"), and a wider
    ``--output-dtype`` where one exists."""
    wider = wider_dtypes(dtype)
    fixes = [f for f in (knob, f"pass --output-dtype {wider}" if wider else "") if f]
    return ", or ".join(fixes) or "check the inputs for values that large"
