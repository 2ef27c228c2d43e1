"""The SVD methods a user can name (``--svd``), each with its help text and one calling
convention: ``factor(delta, rank, *, seed, oversample, n_iter, tol, max_iter) -> LowRank``
(``n_iter`` None: power iterations until the captured energy settles, see
``randomized_svd_op``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .svd import DEFAULT_MAX_ITER, DEFAULT_TOL, LowRank, full_svd, randomized_svd


@dataclass(frozen=True)
class SvdMethod:
    name: str
    help: str
    factor: Callable[..., LowRank]


def _randomized(
    delta: torch.Tensor,
    rank: int,
    *,
    seed: int,
    oversample: int,
    n_iter: int | None,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
) -> LowRank:
    generator = torch.Generator(device=delta.device).manual_seed(seed)
    return randomized_svd(
        delta,
        rank,
        oversample=oversample,
        n_iter=n_iter,
        tol=tol,
        max_iter=max_iter,
        generator=generator,
    )


def _full(delta: torch.Tensor, rank: int, **_sketch) -> LowRank:
    return full_svd(delta, rank)  # exact: no test matrix, sketch or iterations apply


SVD_METHODS: dict[str, SvdMethod] = {
    m.name: m
    for m in (
        SvdMethod(
            "randomized",
            "randomized SVD (Halko et al.), iterates until its error settles; fast",
            _randomized,
        ),
        SvdMethod("full", "exact SVD of each delta (LightX2V's method); the reference", _full),
    )
}
