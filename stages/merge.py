"""Stage: a base weight plus LoRA deltas, ``W + Σ factorᵢ·(upᵢ @ downᵢ)`` and ``+ factor·diff``,
all in fp32."""

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Delta:
    """One LoRA's contribution: ``factor·(up @ down)`` (up ``out×r…``, down ``r×…``) or
    ``factor·diff``; ``factor`` is strength · global alpha · the LoRA's own scale."""

    factor: float
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    diff: torch.Tensor | None = None


def merge_weight(
    base: torch.Tensor, deltas: Iterable[Delta], out: torch.Tensor | None = None
) -> torch.Tensor:
    """``base`` upcast into one fp32 buffer (``out`` when given: fp32, same shape), then every
    delta added in place, in order.

    Low-rank deltas are one ``addmm_`` each, so no ``out×in`` product is ever materialised; a
    conv-shaped base is treated as ``(out, -1)``. ``deltas`` may be a generator, so only one
    LoRA's tensors need to exist at a time."""
    if out is None:
        out = torch.empty(base.shape, dtype=torch.float32, device=base.device)
    out.copy_(base)
    matrix = out.view(out.shape[0], -1) if out.dim() >= 2 else None
    for delta in deltas:
        if delta.diff is not None:
            out.add_(delta.diff, alpha=delta.factor)
        else:
            if matrix is None:
                raise ValueError(
                    f"a low-rank delta needs a base of 2+ dims, got {tuple(base.shape)}"
                )
            matrix.addmm_(fp32_matrix(delta.up), fp32_matrix(delta.down), alpha=delta.factor)
    return out


def fp32_matrix(factor: torch.Tensor) -> torch.Tensor:
    """A LoRA factor as an fp32 matrix (``up`` ``out×r``, ``down`` ``r×…`` flattened)."""
    return factor.reshape(factor.shape[0], -1).to(torch.float32)


def with_fp32_down(delta: Delta) -> Delta:
    """``delta`` with ``down`` already an fp32 matrix, for a caller that merges it block after
    block: every block multiplies all of ``down``, so it is converted once, not per block (the
    same values); ``up`` stays as stored, each block converting only its own rows."""
    if delta.diff is not None:
        return delta
    return Delta(delta.factor, up=delta.up, down=fp32_matrix(delta.down))
