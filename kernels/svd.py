"""Truncated SVD of a 2-D delta into LoRA factors.

``randomized_svd`` is the randomized range finder with subspace iteration of Halko, Martinsson &
Tropp, "Finding structure with randomness", SIAM Review 53(2), 2011 (Algorithms 4.4 and 5.1): a
Gaussian test matrix with ``oversample`` extra columns, power iterations, each followed by a QR
re-orthonormalisation (without it fp32 loses the small directions), then the exact SVD of the small
projected matrix Qᵀ A. The iterations' products may run in bf16 on a bf16 copy of A
(``SvdSettings.sketch``, ``precision.py``); the factors always come from fp32 products. The number
of power iterations is fixed (``n_iter``) or adaptive (``n_iter=None``): iterate, half a step at a
time, until the rank-r energy the basis captures settles, in the spirit of the accuracy-controlled
range finders of Halko et al. §4.3-4.5. At the defaults slowly decaying spectra (σᵢ ∝ i^-0.3 … i^-1)
take 2.5 iterations and land within 0.2% of the optimal rank-32 error (2 reach 0.3%), a fast one
stops at 2. ``randomized_svd_op`` runs on any ``MatrixOperator`` (products with A and Aᵀ), so a
matrix read in row blocks (kernels/blocked.py) shares the iteration logic. ``full_svd`` is the
reference (LightX2V's method).

All return ``up = U·√S`` (out×r), ``down = √S·Vᵀ`` (r×in), the singular values and the exact
relative Frobenius error of ``up @ down``: the approximation is an orthogonal projection of A,
so ‖A − Â‖² = ‖A‖² − Σσᵢ². ‖A‖² is accumulated in fp64 (fp32 sums of tens of millions of
squares read low).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from .precision import SKETCH_CHOICES, sketch_dtype

DEFAULT_TOL = 0.003  # auto: stop when a half-step gains < 0.3% of the energy still missed
DEFAULT_MAX_ITER = 4
MIN_AUTO_ITER = 2  # today's fixed default: auto only ever adds iterations
NOISE = 1e-6  # energy changes below this fraction of ‖A‖² are fp32 rounding, not progress


@dataclass(frozen=True)
class SvdSettings:
    """How the randomized SVD samples and iterates: ``oversample`` extra columns of the test
    matrix; ``n_iter`` power iterations, or None to iterate until the captured energy settles
    (``tol``, at most ``max_iter``); ``sketch``: the dtype of the iterations' products
    (``precision.py``: auto, bf16 or fp32; the factors always come from fp32 products). One
    object from the command line to the kernel (the extraction's ``KernelOptions`` is one);
    an exact SVD ignores it."""

    oversample: int = 16
    n_iter: int | None = None
    tol: float = DEFAULT_TOL
    max_iter: int = DEFAULT_MAX_ITER
    sketch: str = "auto"

    # What a ``ValueError`` calls each field (a subclass may name its command-line options).
    NAMES: ClassVar[dict[str, str]] = {
        "oversample": "oversample",
        "n_iter": "n_iter",
        "tol": "tol",
        "max_iter": "max_iter",
        "sketch": "sketch",
    }

    def __post_init__(self):
        name = self.NAMES
        if self.oversample < 0 or (self.n_iter is not None and self.n_iter < 0):
            raise ValueError(f"{name['oversample']} and {name['n_iter']} must be >= 0")
        if not self.tol > 0.0:
            raise ValueError(f"{name['tol']} must be > 0, got {self.tol}")
        if self.max_iter < 1:
            raise ValueError(f"{name['max_iter']} must be >= 1, got {self.max_iter}")
        if self.sketch not in SKETCH_CHOICES:
            valid = ", ".join(SKETCH_CHOICES)
            raise ValueError(f"{name['sketch']} must be one of {valid}, got {self.sketch!r}")


DEFAULT_SETTINGS = SvdSettings()


@dataclass(frozen=True)
class LowRank:
    up: torch.Tensor  # (out, r) fp32
    down: torch.Tensor  # (r, in) fp32
    singular_values: torch.Tensor  # (r,) fp32
    sq_norm: float  # ‖A‖_F², fp64 accumulation
    residual_sq: float  # ‖A − up·down‖_F²
    iterations: float = 0.0  # power iterations run, in halves (2.5); 0 for an exact SVD

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


class Products(Protocol):
    """Products with a matrix A (m×n): what a power iteration needs."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...  # A·X, (m, q) fp32

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor: ...  # Aᵀ·Y, (n, q) fp32


class MatrixOperator(Products, Protocol):
    """What the randomized SVD needs of a matrix A (m×n): products with it, its squared norm
    and the residual of factors, and optionally cheaper products in a lower precision for the
    iterations. ``DenseOperator`` holds A in memory; a blocked operator can stream row blocks
    from a memory map and reuse the same iteration logic."""

    shape: tuple[int, int]
    device: torch.device

    def project(self, basis: torch.Tensor) -> torch.Tensor: ...  # Qᵀ·A, (q, n); fixed n_iter

    def sq_norm(self) -> float: ...  # ‖A‖_F², fp64 accumulation

    def residual_sq(self, up: torch.Tensor, down: torch.Tensor, captured: float) -> float: ...

    def lowered(self, dtype: torch.dtype) -> Products | None: ...  # None: fp32 products only


# Gives a tensor of this shape and dtype to hold a lowered copy of A (e.g. a buffer reused from
# task to task: a fresh allocation this size costs its page faults, ~1 GB/s).
Scratch = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class DenseOperator:
    """A fp32 matrix in memory (on any device). ``scratch`` gives the tensor its lowered copy
    is made in (default: a new one)."""

    def __init__(self, a: torch.Tensor, scratch: Scratch | None = None):
        self.a = a
        self.shape = (a.shape[0], a.shape[1])
        self.device = a.device
        self.scratch = scratch
        self._sq_norm: float | None = None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.a @ x

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        return self.a.T @ y

    def project(self, basis: torch.Tensor) -> torch.Tensor:
        return basis.T @ self.a

    def sq_norm(self) -> float:
        if self._sq_norm is None:
            self._sq_norm = squared_norm(self.a)
        return self._sq_norm

    def residual_sq(self, up: torch.Tensor, down: torch.Tensor, captured: float) -> float:
        return residual_sq(self.a, up, down, self.sq_norm(), captured)

    def lowered(self, dtype: torch.dtype) -> Products:
        if self.scratch is None:
            return LoweredProducts(self.a.to(dtype))
        return LoweredProducts(self.scratch(tuple(self.a.shape), dtype).copy_(self.a))


class LoweredProducts:
    """Products with a copy of A in a low-precision dtype: the operands are rounded to it, the
    products accumulate in fp32 (as bf16 GEMMs do) and come back as fp32."""

    def __init__(self, low: torch.Tensor):
        self.low = low

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return (self.low @ x.to(self.low.dtype)).float()

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        # (Yᵀ·A)ᵀ: A as the right operand untransposed runs 10-15% faster than Aᵀ·Y in bf16.
        return (y.to(self.low.dtype).T @ self.low).T.float()


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


def _factor(
    op: MatrixOperator,
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    iterations: float = 0.0,
) -> LowRank:
    root = s.sqrt()
    up = (u * root.unsqueeze(0)).contiguous()
    down = (root.unsqueeze(1) * vh).contiguous()
    captured = float((s.double() ** 2).sum())
    residual = op.residual_sq(up, down, captured)
    return LowRank(up, down, s.contiguous(), op.sq_norm(), residual, iterations)


def full_svd(a: torch.Tensor, rank: int) -> LowRank:
    """Rank-``rank`` truncation of the exact SVD (LAPACK/cuSOLVER); the accuracy reference."""
    _check(a, rank)
    a = a.float()
    k = min(rank, *a.shape)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return _factor(DenseOperator(a), u[:, :k], s[:k], vh[:k])


def randomized_svd(
    a: torch.Tensor,
    rank: int,
    settings: SvdSettings = DEFAULT_SETTINGS,
    *,
    generator: torch.Generator | None = None,
    scratch: Scratch | None = None,
) -> LowRank:
    """Rank-``rank`` randomized SVD (Halko et al. 2011) of a dense matrix, fp32 on its device;
    see ``randomized_svd_op``. A sketch as wide as the matrix falls back to the exact SVD.
    ``scratch`` gives the tensor a bf16 sketch copies A into (``DenseOperator``)."""
    _check(a, rank)
    a = a.float()
    m, n = a.shape
    k = min(rank, m, n)
    if min(k + settings.oversample, m, n) == min(m, n):  # the sketch would be the whole matrix
        return full_svd(a, k)
    return randomized_svd_op(DenseOperator(a, scratch), k, settings, generator=generator)


def randomized_svd_op(
    op: MatrixOperator,
    rank: int,
    settings: SvdSettings = DEFAULT_SETTINGS,
    *,
    generator: torch.Generator | None = None,
) -> LowRank:
    """Rank-``rank`` randomized SVD of the matrix behind ``op`` (Halko et al. 2011, Alg. 4.4
    and 5.1), fp32 on ``op.device``.

    ``settings.n_iter`` fixes the number of power iterations (each followed by a QR
    re-orthonormalisation); ``None`` iterates until the rank-``rank`` energy the basis captures
    gains less than ``tol`` times the energy still missing (‖A‖² − Σσᵢ²), from
    ``MIN_AUTO_ITER`` up to ``max_iter`` iterations: a slowly decaying spectrum gets the
    iterations it needs, a fast one stops at the minimum. The defaults (tol 0.003, at most 4)
    keep σᵢ ∝ i^-0.3 … i^-1 within 0.2% of the optimal rank-32 error
    (benchmarks/kernel_accuracy.py).
    ``settings.sketch`` is the dtype of the early products: in bf16 (where the device
    multiplies it natively, ``precision.py``) they run on a bf16 copy of A. Rounding A and the
    basis to bf16 tilts the basis by ~2⁻⁹, an error floor of that size on a nearly low-rank A,
    so the last two products before the factors run in fp32: the first lands the basis in A's
    range (its tilt is multiplied by the small singular values), the second gives the factors.
    For ``auto`` those are the half-steps from ``2·MIN_AUTO_ITER`` on, where the stopping test
    looks, so it compares fp32 estimates only.
    ``generator`` must live on ``op.device``; seed it (e.g. with ``seed_for(name)``) for
    reproducible factors."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    m, n = op.shape
    k = min(rank, m, n)
    q = min(k + settings.oversample, m, n)
    n_iter = settings.n_iter
    # The pass (0: A·Ω, then the half-steps) from which products are fp32.
    exact_from = 2 * (min(MIN_AUTO_ITER, settings.max_iter) if n_iter is None else n_iter)
    passes = Passes(op, sketch_dtype(settings.sketch, op.device), exact_from)
    omega = torch.randn(n, q, generator=generator, device=op.device, dtype=torch.float32)
    basis = torch.linalg.qr(passes.products(0).matmul(omega)).Q
    if n_iter is None:
        return _adaptive(op, passes, basis, k, settings.tol, settings.max_iter)
    for i in range(n_iter):
        basis = torch.linalg.qr(passes.products(2 * i + 1).rmatmul(basis)).Q
        basis = torch.linalg.qr(passes.products(2 * i + 2).matmul(basis)).Q
    small_u, s, vh = torch.linalg.svd(op.project(basis), full_matrices=False)
    u = basis @ small_u[:, :k]
    return _factor(op, u, s[:k], vh[:k], float(n_iter))


class Passes:
    """Which products each pass over A uses: those of a copy of A in ``dtype`` (made on first
    use) before pass ``exact_from``, A's own fp32 ones from it on, and wherever the operator
    has no lowered products."""

    def __init__(self, op: MatrixOperator, dtype: torch.dtype, exact_from: int):
        self.op, self.dtype, self.exact_from = op, dtype, exact_from
        self._lowered: Products | None = None

    def products(self, index: int) -> Products:
        if index >= self.exact_from or self.dtype == torch.float32:
            return self.op
        if self._lowered is None:
            self._lowered = self.op.lowered(self.dtype) or self.op
        return self._lowered


def _adaptive(
    op: MatrixOperator, passes: Passes, basis: torch.Tensor, k: int, tol: float, max_iter: int
):
    """Power iterations, a half (one product with Aᵀ or A) at a time, until the captured
    energy settles; never fewer than the old fixed default (``MIN_AUTO_ITER``) unless
    ``max_iter`` is lower, so at the default cap auto is never less accurate than it. Each
    half-step's QR already holds an approximation of A: AᵀQ = P·R gives QQᵀA = Q·Rᵀ·Pᵀ, and
    AP = Q·R gives APPᵀ = Q·R·Pᵀ (both orthogonal projections of A, so the residual identity
    holds). The singular values of the small R are the captured energy (the test costs a q×q
    SVD), and the factors come from the SVD of R, so stopping costs no extra pass over A, and a
    half-step is the finest unit of work. ``passes`` says which half-steps run in fp32."""
    sq_norm = op.sq_norm()
    current, previous, halves = basis, 0.0, 0
    while True:
        products = passes.products(halves + 1)
        product = products.rmatmul(current) if halves % 2 == 0 else products.matmul(current)
        following, r = torch.linalg.qr(product)
        halves += 1
        if halves > 2 * max_iter:
            break
        if halves >= 2 * MIN_AUTO_ITER:  # the first test compares with this half-step
            captured = float((torch.linalg.svdvals(r)[:k].double() ** 2).sum())
            if halves > 2 * MIN_AUTO_ITER and _settled(previous, captured, sq_norm, tol):
                break
            previous = captured
        current = following
    if halves % 2:  # AᵀQ = P·R, Q = current
        left, core, right = current, r.T, following
    else:  # A·P = Q·R, P = current
        left, core, right = following, r, current
    small_u, s, small_vh = torch.linalg.svd(core)
    return _factor(op, left @ small_u[:, :k], s[:k], small_vh[:k] @ right.T, (halves - 1) / 2)


def _settled(previous: float, captured: float, sq_norm: float, tol: float) -> bool:
    """The last half-step's gain is below ``tol`` of the energy still missed, or below what
    fp32 products resolve (``NOISE`` of ‖A‖²: an exactly low-rank A misses nothing)."""
    gain = captured - previous
    return gain <= tol * (sq_norm - captured) or gain <= NOISE * sq_norm


def _check(a: torch.Tensor, rank: int) -> None:
    if a.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(a.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")


def rounding_distance_sq(
    up: torch.Tensor, down: torch.Tensor, up_rounded: torch.Tensor, down_rounded: torch.Tensor
) -> float:
    """‖up_rounded·down_rounded − up·down‖_F² for factors rounded from ``up``, ``down`` (a
    cast), without forming either product. The difference is T₁ + T₂ with T₁ = δu·down and
    T₂ = up_rounded·δd (δ: rounded − exact, exact in fp32), and ‖X·Y‖² = Σ (XᵀX) ∘ (YYᵀ) gives
    ‖T₁‖², ‖T₂‖² and ⟨T₁, T₂⟩ from r×r grams. Every term is of the difference's own size, so
    fp32 grams (summed in fp64) are accurate, to ~1e-6 relative, where the grams of the two
    products' own factors would cancel down to it."""
    up_rounded, down_rounded = up_rounded.float(), down_rounded.float()
    du, dd = up_rounded - up, down_rounded - down
    terms = (
        (du.T @ du) * (down @ down.T)
        + (up_rounded.T @ up_rounded) * (dd @ dd.T)
        + 2 * (du.T @ up_rounded) * (down @ dd.T)
    )
    return max(float(terms.double().sum()), 0.0)
