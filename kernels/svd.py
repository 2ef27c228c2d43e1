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
    sq_norm: float  # ‖A‖_F², fp64 accumulation
    residual_sq: float  # ‖A − up·down‖_F²

    @property
    def rank(self) -> int:
        return self.singular_values.numel()

    def rel_error(self, rank: int | None = None) -> float:
        """Relative Frobenius error of the rank-``rank`` truncation (default: all kept)."""
        return relative_error(
            self.sq_norm, truncated_residual_sq(self.residual_sq, self.singular_values, rank)
        )


def truncated_residual_sq(residual_sq: float, singular_values, rank: int | None) -> float:
    """Residual of the leading ``rank`` components, from the residual of all of them: the
    dropped components are orthogonal to the rest, so their energy simply adds."""
    dropped = torch.as_tensor(singular_values, dtype=torch.float64)[rank:]
    return residual_sq + float((dropped * dropped).sum()) if rank is not None else residual_sq


def relative_error(sq_norm: float, residual_sq: float) -> float:
    if sq_norm <= 0.0:
        return 0.0
    return math.sqrt(max(residual_sq, 0.0) / sq_norm)


def residual_sq(
    a: torch.Tensor, up: torch.Tensor, down: torch.Tensor, sq_norm: float, captured: float
) -> float:
    """‖A − up·down‖². The identity ‖A‖² − Σσᵢ² is free, but when the residual is under 0.1%
    of ‖A‖² the subtraction cancels (fp32 σᵢ carry ~1e-7 relative error), so it is then
    measured directly, a block of rows at a time (2·m·n·r more flops, small temporaries).
    ``captured`` is Σσᵢ²."""
    cheap = sq_norm - captured
    if cheap > 1e-3 * sq_norm:
        return cheap
    rows = max(1, (1 << 22) // max(a.shape[1], 1))
    return sum(
        squared_norm(a[i : i + rows] - up[i : i + rows] @ down) for i in range(0, a.shape[0], rows)
    )


def seed_for(name: str) -> int:
    """A stable 63-bit seed from a tensor name, so every run draws the same test matrix."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1


def squared_norm(a: torch.Tensor, segment: int = 256) -> float:
    """‖A‖_F² with fp64 accumulation: fp32 norms of 256-element segments (short sums, so
    accurate to ~1e-7) are squared and summed in fp64. As fast as a plain fp32 norm, which on
    tens of millions of elements can read 0.6% low."""
    flat = a.reshape(-1)
    whole = flat.numel() // segment * segment
    head = torch.linalg.vector_norm(flat[:whole].view(-1, segment), dim=1).double()
    tail = flat[whole:].double()
    return float((head * head).sum() + (tail * tail).sum())


def _factor(a: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> LowRank:
    root = s.sqrt()
    up = (u * root.unsqueeze(0)).contiguous()
    down = (root.unsqueeze(1) * vh).contiguous()
    sq_norm = squared_norm(a)
    captured = float((s.double() ** 2).sum())
    residual = residual_sq(a, up, down, sq_norm, captured)
    return LowRank(up, down, s.contiguous(), sq_norm, residual)


def full_svd(a: torch.Tensor, rank: int) -> LowRank:
    """Rank-``rank`` truncation of the exact SVD (LAPACK/cuSOLVER); the accuracy reference."""
    _check(a, rank)
    a = a.float()
    k = min(rank, *a.shape)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return _factor(a, u[:, :k], s[:k], vh[:k])


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
    return _factor(a, u, s[:k], vh[:k])


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
