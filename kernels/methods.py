"""The SVD methods a user can name (``--svd``), each with its help text and one calling
convention: ``factor(delta, rank, *, seed, settings, scratch) -> LowRank`` (``settings``:
the ``SvdSettings`` of a randomized method, see ``randomized_svd_op``; ``scratch``: where its
bf16 sketch copies the delta, see ``DenseOperator``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .svd import LowRank, Scratch, SvdSettings, full_svd, randomized_svd


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
    settings: SvdSettings,
    scratch: Scratch | None = None,
) -> LowRank:
    generator = torch.Generator(device=delta.device).manual_seed(seed)
    return randomized_svd(delta, rank, settings, generator=generator, scratch=scratch)


def _full(
    delta: torch.Tensor,
    rank: int,
    *,
    seed: int,
    settings: SvdSettings,
    scratch: Scratch | None = None,
) -> LowRank:
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
