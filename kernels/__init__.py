"""Numeric kernels: truncated SVD of a weight delta, randomized (default) or full.

``SVD_METHODS`` is the one table of the methods users choose with ``--svd``: the CLI's help and
choices, option validation and the ``lowrank`` stage all read it."""

from .methods import SVD_METHODS, SvdMethod
from .svd import (
    LowRank,
    full_svd,
    product_distance_sq,
    randomized_svd,
    relative_error,
    residual_sq,
    seed_for,
    squared_norm,
    truncated_residual_sq,
)

__all__ = [
    "SVD_METHODS",
    "LowRank",
    "SvdMethod",
    "full_svd",
    "product_distance_sq",
    "randomized_svd",
    "relative_error",
    "residual_sq",
    "seed_for",
    "squared_norm",
    "truncated_residual_sq",
]
