"""What a finished extract task stores and says, shared by its whole and blocked paths."""

from __future__ import annotations

from loraforge.kernels import LowRank

from ..errors import NonFiniteTensor
from .options import KernelOptions
from .plan import ExtractTask


def lowrank_result(factors: LowRank, kernel: KernelOptions, marker: dict) -> tuple[dict, dict]:
    """The arrays to store for ``factors`` and their zarr attributes; ``marker`` gains what
    resume and export need."""
    # Singular values ride on the up array's zarr attributes: one file fewer per tensor.
    attributes = {"up": {"singular_values": factors.singular_values.cpu().tolist()}}
    marker.update(
        kind="lowrank",
        rank=factors.rank,
        sq_norm=factors.sq_norm,
        residual_sq=factors.residual_sq,
        iterations=factors.iterations,
        kernel=kernel.to_dict(),
    )
    return {"up": factors.up, "down": factors.down}, attributes


def nonfinite(task: ExtractTask, target_is_finite: bool) -> NonFiniteTensor:
    """The error for a delta holding NaN or Inf, naming the side that holds them."""
    bad = task.source if target_is_finite else task.target
    return NonFiniteTensor(
        "holds NaN or Inf, so the delta is not finite",
        path=bad.file,
        key=task.key,
        hint="fix or re-save the checkpoint",
    )
