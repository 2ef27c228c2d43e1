"""Stage: a 2-D delta → LoRA factors through the chosen SVD kernel."""

import torch

from loraforge.kernels import (
    DEFAULT_SETTINGS,
    SVD_METHODS,
    LowRank,
    MatrixOperator,
    Scratch,
    SvdSettings,
    randomized_svd_op,
    seed_for,
)


def lowrank(
    delta: torch.Tensor,
    rank: int,
    *,
    name: str,
    method: str = "randomized",
    settings: SvdSettings = DEFAULT_SETTINGS,
    scratch: Scratch | None = None,
) -> LowRank:
    """Rank-``rank`` factors of ``delta`` on its device; a randomized kernel's test matrix is
    seeded from ``name``, so the same tensor always gives the same bytes. ``scratch``: where a
    bf16 sketch copies the delta (default: a new tensor)."""
    try:
        kernel = SVD_METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown SVD method {method!r}; valid: {', '.join(SVD_METHODS)}"
        ) from None
    return kernel.factor(delta, rank, seed=seed_for(name), settings=settings, scratch=scratch)


def lowrank_blocked(
    op: MatrixOperator, rank: int, *, name: str, settings: SvdSettings = DEFAULT_SETTINGS
) -> LowRank:
    """Rank-``rank`` factors of the matrix behind ``op`` (``kernels.RowBlocks``: read a block
    of rows at a time) by the randomized SVD on ``op.device``, seeded from ``name`` as
    ``lowrank`` seeds it."""
    generator = torch.Generator(device=op.device).manual_seed(seed_for(name))
    return randomized_svd_op(op, rank, settings, generator=generator)
