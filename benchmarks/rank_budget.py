"""Fixed rank against ``--rank-mode budget`` at the same parameter count: total squared error
over a set of generated deltas of different shapes, decays and sizes.

Each delta is factored once at the cap (the randomized SVD with its defaults, as ``extract``
does); the budget is what fixed rank r costs, Σ r·(out + in), and budget mode spends it where
each rank removes the most squared error per parameter. Errors are measured directly,
‖Δ − up_k·down_k‖² in fp64, not read off the spectra.

    python benchmarks/rank_budget.py [--cap 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import format_table  # noqa: E402

from loraforge.kernels import RankRule, Spectrum, SvdSettings, randomized_svd, seed_for  # noqa: E402

SHAPES = [(1024, 1024), (1024, 2816), (2816, 1024), (512, 512)]
DECAYS = [0.4, 0.8, 1.5]  # σᵢ ∝ i^-p
FIXED = [4, 8, 16, 32, 64]


def deltas() -> dict[str, torch.Tensor]:
    """Twelve deltas: every shape with every decay, norms a few-fold apart (as layers are)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for j, ((m, n), p) in enumerate((shape, p) for shape in SHAPES for p in DECAYS):
        k = min(m, n)
        u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
        v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
        s = torch.arange(1, k + 1, dtype=torch.float32) ** -p * (1 + j % 4)
        out[f"blocks.{j}.{m}x{n}.p{p}"] = (u * s) @ v.T
    return out


def squared_error(delta: torch.Tensor, up: torch.Tensor, down: torch.Tensor, k: int) -> float:
    rest = delta.double() - up[:, :k].double() @ down[:k].double()
    return float((rest * rest).sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=128, help="factorisation rank (--rank)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    tensors = deltas()
    factors = {
        name: randomized_svd(
            d,
            args.cap,
            SvdSettings(n_iter=None),
            generator=torch.Generator().manual_seed(seed_for(name)),
        )
        for name, d in tensors.items()
    }
    spectra = [Spectrum.of(f) for f in factors.values()]
    total = sum(f.sq_norm for f in factors.values())
    rows = []
    for r in FIXED:
        budget = sum(r * s.params_per_rank for s in spectra)
        chosen = RankRule("budget", rank=args.cap, rank_budget=budget).choose(spectra)
        spent = sum(k * s.params_per_rank for k, s in zip(chosen, spectra, strict=True))
        fixed = sum(squared_error(tensors[n], f.up, f.down, r) for n, f in factors.items())
        greedy = sum(
            squared_error(tensors[n], f.up, f.down, k)
            for (n, f), k in zip(factors.items(), chosen, strict=True)
        )
        rows.append(
            {
                "fixed rank": r,
                "parameters": budget,
                "budget spent": spent,
                "fixed err²/‖Δ‖²": f"{fixed / total:.5f}",
                "budget err²/‖Δ‖²": f"{greedy / total:.5f}",
                "budget / fixed": f"{greedy / fixed:.3f}",
                "budget ranks min-max": f"{min(chosen)}-{max(chosen)}",
            }
        )
    print(f"{len(tensors)} deltas: shapes {SHAPES} x σᵢ ∝ i^-p, p in {DECAYS}; cap {args.cap}")
    print(format_table(rows, list(rows[0])))
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
