"""Truncated SVD of a 2-D delta into LoRA factors.

``randomized_svd`` is the randomized range finder with subspace iteration of Halko, Martinsson
& Tropp, "Finding structure with randomness", SIAM Review 53(2), 2011 (Algorithms 4.4 and 5.1):
a Gaussian test matrix with ``oversample`` extra columns, ``n_iter`` power iterations, each
followed by a QR re-orthonormalisation (without it fp32 loses the small directions), then the
exact SVD of the small projected matrix Qᵀ A. ``full_svd`` is the reference (LightX2V's method).

Both return ``up = U·√S`` (out×r), ``down = √S·Vᵀ`` (r×in), the singular values and the exact
relative Frobenius error of ``up @ down``: the approximation is an orthogonal projection of A,
so ‖A − Â‖² = ‖A‖² − Σσᵢ². ‖A‖² is accumulated in fp64 (fp32 sums of tens of millions of
squares read low).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LowRank:
    up: torch.Tensor  # (out, r) fp32
    down: torch.Tensor  # (r, in) fp32
    singular_values: torch.Tensor  # (r,) fp32
    sq_norm: float  # ‖A‖_F² in fp64

    @property
    def rank(self) -> int:
        return self.singular_values.numel()

    def rel_error(self, rank: int | None = None) -> float:
        """Relative Frobenius error of the rank-``rank`` truncation (default: all kept)."""
        kept = self.singular_values[: self.rank if rank is None else rank].double()
        return relative_error(self.sq_norm, float((kept * kept).sum()))


def relative_error(sq_norm: float, captured: float) -> float:
    if sq_norm <= 0.0:
        return 0.0
    return math.sqrt(max(sq_norm - captured, 0.0) / sq_norm)


def seed_for(name: str) -> int:
    """A stable 63-bit seed from a tensor name, so every run draws the same test matrix."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


def squared_norm(a: torch.Tensor) -> float:
    """‖A‖_F² summed in fp64 over fp32 row norms (no full-size temporary)."""
    rows = a.reshape(a.shape[0], -1)
    return float((torch.linalg.vector_norm(rows, dim=1).double() ** 2).sum())


def _factor(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, sq_norm: float) -> LowRank:
    root = s.sqrt()
    up = (u * root.unsqueeze(0)).contiguous()
    down = (root.unsqueeze(1) * vh).contiguous()
    return LowRank(up, down, s.contiguous(), sq_norm)


def full_svd(a: torch.Tensor, rank: int) -> LowRank:
    """Rank-``rank`` truncation of the exact SVD (LAPACK/cuSOLVER); the accuracy reference."""
    _check(a, rank)
    a = a.float()
    k = min(rank, *a.shape)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return _factor(u[:, :k], s[:k], vh[:k], squared_norm(a))


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    *,
    oversample: int = 16,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> LowRank:
    """Rank-``rank`` randomized SVD (Halko et al. 2011), fp32 on ``a``'s device.

    ``generator`` must live on ``a``'s device; seed it (e.g. with ``seed_for(name)``) for
    reproducible factors."""
    _check(a, rank)
    if oversample < 0 or n_iter < 0:
        raise ValueError("oversample and n_iter must be >= 0")
    a = a.float()
    m, n = a.shape
    k = min(rank, m, n)
    q = min(k + oversample, m, n)
    if q == min(m, n):  # the sketch would be as large as the matrix: exact is cheaper
        return full_svd(a, k)
    omega = torch.randn(n, q, generator=generator, device=a.device, dtype=torch.float32)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(n_iter):
        basis = torch.linalg.qr(a.T @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    small_u, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    u = basis @ small_u[:, :k]
    return _factor(u, s[:k], vh[:k], squared_norm(a))


def _check(a: torch.Tensor, rank: int) -> None:
    if a.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(a.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")


def product_distance_sq(
    up_a: torch.Tensor, down_a: torch.Tensor, up_b: torch.Tensor, down_b: torch.Tensor
) -> float:
    """‖up_a·down_a − up_b·down_b‖_F² without forming either product, in fp64:
    with X = [up_a, up_b] and Y = [down_a; −down_b], ‖XY‖² = Σ (XᵀX) ∘ (YYᵀ)."""
    x = torch.cat([up_a, up_b], dim=1).double()
    y = torch.cat([down_a, -down_b], dim=0).double()
    return max(float(((x.T @ x) * (y @ y.T)).sum()), 0.0)
