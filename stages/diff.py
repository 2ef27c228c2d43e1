"""Stage: the fp32 weight delta ``target − base``."""

import torch


def weight_delta(
    base: torch.Tensor,
    target: torch.Tensor,
    out: torch.Tensor | None = None,
    scratch: torch.Tensor | None = None,
) -> torch.Tensor:
    """``target − base`` in fp32 (inputs in any float dtype, on the same device).

    The target is upcast into the result and the base subtracted in place; ``out`` (fp32, same
    shape) lets the caller reuse a buffer. With ``scratch`` (likewise) a low-precision base is
    upcast there first: an fp32 − fp32 subtraction is vectorised, while a mixed-dtype in-place
    one converts element by element (4× slower on CPU). Either way the result is exact."""
    if base.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(base.shape)} vs {tuple(target.shape)}")
    if out is None:
        out = torch.empty(target.shape, dtype=torch.float32, device=target.device)
    if scratch is not None and base.dtype != torch.float32:
        base = scratch.copy_(base)
    return out.copy_(target).sub_(base)


def max_abs(delta: torch.Tensor) -> float:
    """max |delta| (NaN if any entry is NaN, inf if any is infinite); one cheap pass."""
    if delta.numel() == 0:
        return 0.0
    low, high = torch.aminmax(delta)
    return max(-float(low), float(high)) if not torch.isnan(low + high) else float("nan")


def is_unchanged(max_abs_delta: float, atol: float = 1e-8) -> bool:
    """LightX2V's rule: a delta whose every entry is within ``atol`` of zero is no change."""
    return max_abs_delta <= atol
