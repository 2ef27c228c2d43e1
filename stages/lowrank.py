"""Stage: a 2-D delta → LoRA factors through the chosen SVD kernel."""

import torch

from loraforge.kernels import SVD_METHODS, LowRank, MatrixOperator, randomized_svd_op, seed_for
from loraforge.kernels.svd import DEFAULT_MAX_ITER, DEFAULT_TOL


def lowrank(
    delta: torch.Tensor,
    rank: int,
    *,
    name: str,
    method: str = "randomized",
    oversample: int = 16,
    n_iter: int | None = None,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
) -> LowRank:
    """Rank-``rank`` factors of ``delta`` on its device; a randomized kernel's test matrix is
    seeded from ``name``, so the same tensor always gives the same bytes. ``n_iter`` None:
    power iterations until the captured energy settles (``tol``, at most ``max_iter``)."""
    try:
        kernel = SVD_METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown SVD method {method!r}; valid: {', '.join(SVD_METHODS)}"
        ) from None
    return kernel.factor(
        delta,
        rank,
        seed=seed_for(name),
        oversample=oversample,
        n_iter=n_iter,
        tol=tol,
        max_iter=max_iter,
    )


def lowrank_blocked(
    op: MatrixOperator,
    rank: int,
    *,
    name: str,
    oversample: int = 16,
    n_iter: int | None = None,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
) -> LowRank:
    """Rank-``rank`` factors of the matrix behind ``op`` (``kernels.RowBlocks``: read a block
    of rows at a time) by the randomized SVD on ``op.device``, seeded from ``name`` as
    ``lowrank`` seeds it."""
    generator = torch.Generator(device=op.device).manual_seed(seed_for(name))
    return randomized_svd_op(
        op,
        rank,
        oversample=oversample,
        n_iter=n_iter,
        tol=tol,
        max_iter=max_iter,
        generator=generator,
    )
