"""Stage: cast a result to the output dtype (non-float tensors pass through untouched)."""

import torch


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.contiguous()
