"""The exact SVD of a weighted sum of low-rank products, without forming the dense sum.

Σᵢ fᵢ·upᵢ·downᵢ = X·Yᵀ with X = [f₁·up₁, …, f_k·up_k] (m×R) and Y = [down₁ᵀ, …, down_kᵀ]
(n×R), R = Σ rᵢ. With X = Q_x·R_x and Y = Q_y·R_y (thin QR), the sum is
Q_x·(R_x·R_yᵀ)·Q_yᵀ, so the SVD of the small core R_x·R_yᵀ = W·S·Zᵀ gives the SVD of the sum:
U = Q_x·W, V = Q_y·Z. Cost O((m + n)·R²) instead of O(m·n·R) for the product and O(m·n²) for
its SVD (kohya's svd_merge_lora and resize_lora form the product and run a full SVD).

Computed in fp64 (the factors are small), returned as fp32 LoRA factors like ``full_svd``:
up = U·√S, down = √S·Vᵀ. ‖sum‖² is Σ S² of the whole core (exact), and the residual of a
truncation is the S² it drops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .svd import LowRank


def refactor_sum(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    factors: Sequence[float],
    rank: int | None = None,
) -> LowRank:
    """SVD of Σ factors[i]·ups[i]·downs[i] (up m×rᵢ, down rᵢ×n), on the first up's device,
    truncated to ``rank`` when given (the full spectrum, min(R, m, n) values, otherwise)."""
    _check(ups, downs, factors, rank)
    device = ups[0].device
    x = torch.cat([f * u.to(device, torch.float64) for u, f in zip(ups, factors, strict=True)], 1)
    y = torch.cat([d.to(device, torch.float64).T for d in downs], 1)
    qx, rx = torch.linalg.qr(x)
    qy, ry = torch.linalg.qr(y)
    w, s, zh = torch.linalg.svd(rx @ ry.T, full_matrices=False)
    k = s.numel() if rank is None else min(rank, s.numel())
    root = s[:k].sqrt()
    up = (qx @ w[:, :k]) * root
    down = root.unsqueeze(1) * (zh[:k] @ qy.T)
    sq_norm = float((s * s).sum())
    residual = float((s[k:] * s[k:]).sum())
    return LowRank(up.float(), down.float(), s[:k].float(), sq_norm, residual)


def _check(ups, downs, factors, rank) -> None:
    if not ups or not (len(ups) == len(downs) == len(factors)):
        raise ValueError(
            f"refactor_sum needs as many ups, downs and factors (at least one), "
            f"got {len(ups)}, {len(downs)}, {len(factors)}"
        )
    m, n = ups[0].shape[0], downs[0].shape[1]
    for i, (up, down) in enumerate(zip(ups, downs, strict=True)):
        if up.dim() != 2 or down.dim() != 2 or up.shape[0] != m or down.shape[1] != n:
            raise ValueError(
                f"term {i}: up {tuple(up.shape)} and down {tuple(down.shape)} do not form "
                f"a {m}x{n} product"
            )
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"term {i}: up has rank {up.shape[1]}, down has {down.shape[0]}")
    if any(not math.isfinite(f) for f in factors):
        raise ValueError("refactor_sum factors must be finite")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
