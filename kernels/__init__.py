"""Numeric kernels: truncated SVD of a weight delta, randomized (default) or full."""

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
    "LowRank",
    "full_svd",
    "product_distance_sq",
    "randomized_svd",
    "relative_error",
    "residual_sq",
    "seed_for",
    "squared_norm",
    "truncated_residual_sq",
]
