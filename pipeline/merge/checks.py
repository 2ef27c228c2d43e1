"""What a merge task writes is checked finite as it is cast (``io/finite.py``), in the task, so
the typed error travels back to the client as the task's failure and ends the run as one line
naming the tensor, the LoRAs with their strengths and scales, and the output dtype's range.

A value the base tensor itself held (an fp32 base's -Inf mask, say) is carried as it is, like a
tensor copied unchanged: only what loraforge computes must be finite. ``--allow-nonfinite``
writes non-finite results as well."""

from __future__ import annotations

import torch

from ..io.finite import check_written, is_finite, output_fix
from ..lora.patches import describe
from .plan import MergeTask


def checked(
    task: MergeTask,
    result: torch.Tensor,
    base: torch.Tensor,
    dtype: torch.dtype,
    allow_nonfinite: bool,
) -> torch.Tensor:
    """``result`` (the bytes about to be written for ``task``, or a block of them), after
    checking it finite unless ``base`` (the stored values it came from, the same rows) was
    not."""
    if allow_nonfinite or task.kind == "copied" or is_finite(result) or not is_finite(base):
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
