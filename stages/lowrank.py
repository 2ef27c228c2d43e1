"""Stage: a 2-D delta → LoRA factors through the chosen SVD kernel."""

import torch

from loraforge.kernels import SVD_METHODS, LowRank, seed_for


def lowrank(
    delta: torch.Tensor,
    rank: int,
    *,
    name: str,
    method: str = "randomized",
    oversample: int = 16,
    n_iter: int = 2,
) -> LowRank:
    """Rank-``rank`` factors of ``delta`` on its device; a randomized kernel's test matrix is
    seeded from ``name``, so the same tensor always gives the same bytes."""
    try:
        kernel = SVD_METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown SVD method {method!r}; valid: {', '.join(SVD_METHODS)}"
        ) from None
    return kernel.factor(delta, rank, seed=seed_for(name), oversample=oversample, n_iter=n_iter)
