"""Stage: cast a result to the output dtype (non-float tensors pass through untouched)."""

import torch


def needs_cast(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``cast`` converts ``tensor`` (so a caller knows when to offer an ``out``)."""
    return tensor.is_floating_point() and tensor.dtype != dtype


def cast(tensor: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """``tensor`` as ``dtype``, contiguous. ``out`` (``dtype``, same shape) lets the caller reuse
    a buffer instead of fresh memory; it is used only when a conversion happens."""
    if not needs_cast(tensor, dtype):
        return tensor.contiguous()
    if out is None:
        return tensor.to(dtype).contiguous()
    return out.copy_(tensor)
