"""The SVD methods a user can name (``--svd``), each with its help text and one calling
convention: ``factor(delta, rank, *, seed, oversample, n_iter) -> LowRank``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .svd import LowRank, full_svd, randomized_svd


@dataclass(frozen=True)
class SvdMethod:
    name: str
    help: str
    factor: Callable[..., LowRank]


def _randomized(
    delta: torch.Tensor, rank: int, *, seed: int, oversample: int, n_iter: int
) -> LowRank:
    generator = torch.Generator(device=delta.device).manual_seed(seed)
    return randomized_svd(delta, rank, oversample=oversample, n_iter=n_iter, generator=generator)


def _full(delta: torch.Tensor, rank: int, *, seed: int, oversample: int, n_iter: int) -> LowRank:
    return full_svd(delta, rank)  # exact: no test matrix, so seed and sketch sizes do not apply


SVD_METHODS: dict[str, SvdMethod] = {
    m.name: m
    for m in (
        SvdMethod(
            "randomized",
            "randomized SVD (Halko et al.), within 1% of optimal at the defaults; fast",
            _randomized,
        ),
        SvdMethod("full", "exact SVD of each delta (LightX2V's method); the reference", _full),
    )
}
