"""The numbers that scale a LoRA (strengths, alphas, their products): checked finite and within
float32's range before any work, wherever they come from (options, configs, PEFT and diffusers
metadata, ``.alpha`` tensors, the Python API). Every delta is added in fp32 with its factor
passed to torch as an fp32 scalar, so a larger factor could only end in Inf (or in torch's own
"cannot be converted to type float without overflow")."""

from __future__ import annotations

import math
import numbers

from ..errors import LoraforgeError, UsageError

FP32_MAX = 3.4028234663852886e38
RANGE = "float32's range (±3.4e+38), in which LoRAs are applied"


def is_number(value: object) -> bool:
    """A real number, not a bool (``True`` is no strength)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def checked(
    value: object,
    what: str,
    *,
    path: str | None = None,
    error: type[LoraforgeError] = UsageError,
    hint: str | None = None,
) -> float:
    """``value`` as a float, or ``error`` naming ``what`` (and the file ``path``): a number
    that is NaN, infinite or beyond float32's range is refused."""
    if not is_number(value):
        raise error(f"{what} must be a number, got {value!r}", path=path, hint=hint)
    try:
        number = float(value)
    except OverflowError:  # an int past float64: beyond float32 all the more
        raise error(f"{what} {value} is outside {RANGE}", path=path, hint=hint) from None
    if not math.isfinite(number):
        raise error(f"{what} must be finite, got {value!r}", path=path, hint=hint)
    if abs(number) > FP32_MAX:
        raise error(f"{what} {value!r} is outside {RANGE}", path=path, hint=hint)
    return number


def in_range(value: float) -> bool:
    """Whether a product of checked numbers (strength · alpha · scale) is still usable."""
    return math.isfinite(value) and abs(value) <= FP32_MAX
