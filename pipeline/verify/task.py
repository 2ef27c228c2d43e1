"""What one Dask task of a verification does to one tensor: read B and F by memory map a block
of rows at a time, add every LoRA's contribution to those rows, and sum in fp64

    error² = ‖B + Σ fᵢ·Δᵢ − F‖²    and    change² = ‖F − B‖²

(fᵢ = strength · alpha · the LoRA's scale, Δᵢ = upᵢ·downᵢ or diffᵢ). Blocks keep memory at
a few MiB whatever the tensor's size; only the two sums travel back."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack

import torch

from ..errors import NonFiniteTensor
from ..io.reader import load_tensor, mapped
from .plan import VerifyTask

BLOCK_ELEMENTS = 1 << 20  # fp64 elements per block of rows: 8 MiB per operand


def _rows(view: torch.Tensor) -> torch.Tensor:
    """The tensor as (rows, columns): its first dimension by the rest (a scalar: one row)."""
    return view.reshape(view.shape[0] if view.dim() else 1, -1)


def run_verify_task(task: VerifyTask) -> dict:
    start = time.perf_counter()
    torch.set_num_threads(1)  # sums independent of --workers
    error_sq = change_sq = 0.0
    with ExitStack() as stack:
        base = _rows(stack.enter_context(mapped(task.base)))
        target = _rows(stack.enter_context(mapped(task.target)))
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
            change = target[i : i + step].double() - base[i : i + step].double()
            error = -change
            for factor, up, other in terms:
                block = other[i : i + step].double() if up is None else up[i : i + step] @ other
                error += factor * block
            error_sq += float((error * error).sum())
            change_sq += float((change * change).sum())
    if not (math.isfinite(error_sq) and math.isfinite(change_sq)):
        raise NonFiniteTensor(
            "B + LoRA or F holds NaN or Inf here",
            path=task.target.file,
            key=task.key,
            hint="check the models and LoRAs for NaN/Inf",
        )
    return {
        "key": task.key,
        "error_sq": error_sq,
        "change_sq": change_sq,
        "seconds": round(time.perf_counter() - start, 4),
    }
