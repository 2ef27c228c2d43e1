"""Randomized SVD accuracy: error of loraforge's kernel over the optimal rank-r error (full
SVD) on matrices with known spectra, for the default (oversample 16, 2 power iterations) and
for cheaper settings.

    python benchmarks/kernel_accuracy.py [--rows 3000] [--cols 1536]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import format_table  # noqa: E402

from loraforge.kernels import full_svd, randomized_svd  # noqa: E402

SETTINGS = [(16, 2), (16, 1), (32, 1)]  # (oversample, power iterations); the first is default


def spectra(n: int) -> dict[str, torch.Tensor]:
    i = torch.arange(1, n + 1, dtype=torch.float32)
    return {
        "slow (1/sqrt(i))": 1 / i**0.5,
        "moderate (1/i)": 1 / i,
        "fast (1/i^2)": 1 / i**2,
        "rank 16 + slow tail": torch.cat([torch.full((16,), 10.0), 0.3 / i[: n - 16] ** 0.3]),
        "flat": torch.ones(n),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--cols", type=int, default=1536)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(args.rows, args.cols, generator=g)).Q
    v = torch.linalg.qr(torch.randn(args.cols, args.cols, generator=g)).Q
    rows = []
    for name, s in spectra(args.cols).items():
        a = (u * s) @ v.T
        for rank in (32, 64, 128):
            optimal = full_svd(a, rank).rel_error()
            row = {"spectrum": name, "rank": rank}
            for p, q in SETTINGS:
                gen = torch.Generator().manual_seed(1)
                approx = randomized_svd(a, rank, oversample=p, n_iter=q, generator=gen)
                row[f"p{p} q{q}"] = f"{approx.rel_error() / optimal:.4f}"
            rows.append(row)
    print(format_table(rows, ["spectrum", "rank", *(f"p{p} q{q}" for p, q in SETTINGS)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
