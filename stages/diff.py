"""Stage: the fp32 weight delta ``target − base``."""

import torch


def weight_delta(base: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target − base`` in fp32 (inputs in any float dtype, on the same device).

    One fp32 allocation: the target is upcast into the result and the base subtracted in place,
    so no fp32 copy of the base is made."""
    if base.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(base.shape)} vs {tuple(target.shape)}")
    delta = torch.empty(target.shape, dtype=torch.float32, device=target.device)
    delta.copy_(target)
    return delta.sub_(base)


def is_unchanged(delta: torch.Tensor, atol: float = 1e-8) -> bool:
    """LightX2V's rule: a delta whose every entry is within ``atol`` of zero is no change."""
    return delta.numel() == 0 or float(delta.abs().max()) <= atol
