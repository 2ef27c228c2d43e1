"""Numeric kernels: truncated SVD of a weight delta, randomized (default, with adaptive power
iterations) or full, on a dense matrix or a row-blocked operator; the exact SVD of a sum of
LoRA products (``refactor_sum``); rank selection from stored spectra (``RankRule``).

``SVD_METHODS`` is the one table of the methods users choose with ``--svd``, ``RANK_MODES`` of
the ``--rank-mode`` rules: the CLI's help and choices, option validation and dispatch read them."""

if __name__ == "kernels":  # a bare `import kernels` from the checkout root: not us
    from loraforge._checkout import step_aside

    step_aside(__name__, __file__)
else:
    from .blocked import RowBlocks
    from .methods import SVD_METHODS, SvdMethod
    from .precision import SKETCH_CHOICES, sketch_dtype
    from .ranks import RANK_MODES, RankMode, RankRule, Spectrum, kept_energy
    from .stacked import refactor_sum
    from .svd import (
        DEFAULT_SETTINGS,
        DenseOperator,
        LowRank,
        MatrixOperator,
        Products,
        Scratch,
        SvdSettings,
        full_svd,
        randomized_svd,
        randomized_svd_op,
        relative_error,
        residual_sq,
        rounding_distance_sq,
        seed_for,
        squared_norm,
        truncated_residual_sq,
    )

    __all__ = [
        "DEFAULT_SETTINGS",
        "RANK_MODES",
        "SKETCH_CHOICES",
        "SVD_METHODS",
        "DenseOperator",
        "LowRank",
        "MatrixOperator",
        "Products",
        "Scratch",
        "RankMode",
        "RankRule",
        "RowBlocks",
        "Spectrum",
        "SvdMethod",
        "SvdSettings",
        "full_svd",
        "kept_energy",
        "randomized_svd",
        "randomized_svd_op",
        "refactor_sum",
        "relative_error",
        "residual_sq",
        "rounding_distance_sq",
        "seed_for",
        "sketch_dtype",
        "squared_norm",
        "truncated_residual_sq",
    ]
