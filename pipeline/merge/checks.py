"""What a merge task writes is checked finite as it is cast (``io/finite.py``), in the task, so
the typed error travels back to the client as the task's failure and ends the run as one line
naming the tensor, the LoRAs with their strengths and scales, and the output dtype's range.

A value the base tensor itself held (an fp32 base's -Inf mask, say) is carried as it is, like a
tensor copied unchanged: only what loraforge computes must be finite. ``--allow-nonfinite``
writes non-finite results as well. Either way the task's marker says so (``Carried``) and the
run warns, naming the tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..io.finite import check_written, is_finite, output_fix
from ..lora.patches import describe
from .plan import MergeTask


@dataclass
class Carried:
    """Why a task wrote NaN or Inf without refusing it ("" while it has not): its marker
    says so, and the run warns."""

    why: str = ""


def checked(
    task: MergeTask,
    result: torch.Tensor,
    base: torch.Tensor,
    dtype: torch.dtype,
    allow_nonfinite: bool,
    carried: Carried | None = None,
) -> torch.Tensor:
    """``result`` (the bytes about to be written for ``task``, or a block of them), after
    checking it finite; NaN or Inf that ``base`` (the stored values it came from, the same
    rows) already held, or that ``--allow-nonfinite`` lets through, is noted in ``carried``."""
    if task.kind == "copied" or is_finite(result):
        return result
    base_held = not is_finite(base)
    if allow_nonfinite or base_held:
        if carried is not None:
            carried.why = "the base held it" if base_held else "--allow-nonfinite"
        return result
    if task.patches:
        made_from = f"{task.base.file} + {describe(task.patches)}"
        knob = "lower --strength or --alpha"
    else:
        made_from = f"{task.base.file}, cast from {task.base.dtype}"
        knob = None
    fix = output_fix(dtype, knob)
    key = task.base.key if task.part == "scale" else task.key  # a scale: its weight's value
    check_written(result, key=key, made_from=made_from, fix=fix, dtype=dtype)
    return result
