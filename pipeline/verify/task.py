"""What one Dask task of a verification does to one tensor: read B and F by memory map a block
of rows at a time, add every LoRA's contribution to those rows, and sum in fp64

    error² = ‖B + Σ fᵢ·Δᵢ − F‖²    and    change² = ‖F − B‖²

(fᵢ = strength · alpha · the LoRA's scale, Δᵢ = upᵢ·downᵢ or diffᵢ). A scaled-fp8 B or F counts
as its value W_fp8 · scale (io/fp8.py), dequantized block by block. Blocks keep memory at a few
MiB whatever the tensor's size; only the two sums travel back."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack

import torch

from loraforge.stages.quantize import dequantize, scale_rows

from ..errors import NonFiniteTensor
from ..io.finite import is_finite
from ..io.reader import TensorInfo, load_tensor, mapped
from ..lora.patches import describe
from .plan import VerifyTask

BLOCK_ELEMENTS = 1 << 20  # fp64 elements per block of rows: 8 MiB per operand


def _rows(view: torch.Tensor) -> torch.Tensor:
    """The tensor as (rows, columns): its first dimension by the rest (a scalar: one row)."""
    if not view.dim():
        return view.reshape(1, 1)
    return view.reshape(view.shape[0], math.prod(view.shape[1:]))


def _block(view: torch.Tensor, scale: torch.Tensor | None, start: int, stop: int):
    """Rows ``start:stop`` of a weight in fp64: a scaled-fp8 one as W_fp8 · scale (fp32, as
    ``load_weight`` gives it)."""
    rows = view[start:stop]
    if scale is not None:
        rows = dequantize(rows, scale_rows(scale, start, stop))
    return rows.double()


def _scale(info: TensorInfo) -> torch.Tensor | None:
    return None if info.scale is None else load_tensor(info.scale)


def run_verify_task(task: VerifyTask) -> dict:
    start = time.perf_counter()
    torch.set_num_threads(1)  # sums independent of --workers
    error_sq = change_sq = 0.0
    with ExitStack() as stack:
        base = _rows(stack.enter_context(mapped(task.base)))
        target = _rows(stack.enter_context(mapped(task.target)))
        base_scale, target_scale = _scale(task.base), _scale(task.target)
        terms = []  # (factor, up rows or None, down or the diff's rows)
        for patch in task.patches:
            if patch.diff is not None:
                terms.append((patch.factor, None, _rows(stack.enter_context(mapped(patch.diff)))))
            else:
                up = load_tensor(patch.up, torch.float64)
                down = load_tensor(patch.down, torch.float64)
                terms.append((patch.factor, _rows(up), down.reshape(down.shape[0], -1)))
        step = max(1, BLOCK_ELEMENTS // max(base.shape[1], 1))
        for i in range(0, base.shape[0], step):
            change = _block(target, target_scale, i, i + step) - _block(
                base, base_scale, i, i + step
            )
            error = -change
            for factor, up, other in terms:
                block = other[i : i + step].double() if up is None else up[i : i + step] @ other
                error += factor * block
            error_sq += float((error * error).sum())
            change_sq += float((change * change).sum())
    if not (math.isfinite(error_sq) and math.isfinite(change_sq)):
        raise _culprit(task)
    return {
        "key": task.key,
        "error_sq": error_sq,
        "change_sq": change_sq,
        "seconds": round(time.perf_counter() - start, 4),
    }


def _culprit(task: VerifyTask) -> NonFiniteTensor:
    """Which input makes the sums NaN or Inf (read again: the rare path): F, B, a LoRA tensor,
    or none of them, when only B + LoRA leaves fp64's range."""
    for info, what in ((task.target, "the fine-tuned model"), (task.base, "the base")):
        with mapped(info) as view:
            if not is_finite(view):
                return NonFiniteTensor(
                    f"holds NaN or Inf ({what})", path=info.file, key=info.key,
                    hint="fix or re-save the checkpoint",
                )  # fmt: skip
    for patch in task.patches:
        for info in patch.tensors:
            with mapped(info) as view:
                if not is_finite(view):
                    return NonFiniteTensor(
                        "holds NaN or Inf", path=info.file, key=info.key, hint="fix the LoRA"
                    )
    return NonFiniteTensor(
        f"B + LoRA leaves fp64's range here; made from {describe(task.patches)}",
        path=task.base.file,
        key=task.key,
        hint="lower --strength",
    )
