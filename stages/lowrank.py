"""Stage: a 2-D delta → LoRA factors through the chosen SVD kernel."""

import torch

from loraforge.kernels import LowRank, full_svd, randomized_svd, seed_for

METHODS = ("randomized", "full")


def lowrank(
    delta: torch.Tensor,
    rank: int,
    *,
    name: str,
    method: str = "randomized",
    oversample: int = 16,
    n_iter: int = 2,
) -> LowRank:
    """Rank-``rank`` factors of ``delta`` on its device; the randomized kernel's test matrix is
    seeded from ``name``, so the same tensor always gives the same bytes."""
    if method == "full":
        return full_svd(delta, rank)
    if method != "randomized":
        raise ValueError(f"unknown SVD method {method!r}; valid: {', '.join(METHODS)}")
    generator = torch.Generator(device=delta.device).manual_seed(seed_for(name))
    return randomized_svd(delta, rank, oversample=oversample, n_iter=n_iter, generator=generator)
