"""What one Dask task of a resize does to one target weight: load the LoRA tensors that patch
it by memory map, refactor the exact sum (``kernels.refactor_sum``: QR of the stacked factors,
SVD of the small core, fp64) or add up the dense diffs, and store the fp32 result with its whole
spectrum in the work directory. Only the small marker travels back."""

from __future__ import annotations

import time

import torch

from loraforge.kernels.stacked import refactor_sum

from ..errors import NonFiniteTensor
from ..lora.patches import load_deltas
from ..workdir import WorkDir
from .plan import ResizeTask


def _dense_sum(task: ResizeTask, deltas) -> torch.Tensor:
    """Σ factor · (diff or up @ down) in fp64, at the target's shape."""
    total = torch.zeros(task.shape, dtype=torch.float64)
    for delta in deltas:
        if delta.diff is not None:
            total += delta.factor * delta.diff.double().reshape(task.shape)
        else:
            up = delta.up.double().reshape(delta.up.shape[0], -1)
            down = delta.down.double().reshape(delta.down.shape[0], -1)
            total += delta.factor * (up @ down).reshape(task.shape)
    return total


def _distance_sq(deltas, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖Σ fᵢ·upᵢ·downᵢ − up·down‖² in fp64 without forming either product, split along the
    exact sum's column space: with the stacked X = [fᵢ·upᵢ…] = Q·R and Y = [downᵢ…],
    the part inside is Qᵀ·up·down − R·Y (R×n), the part outside (I − QQᵀ)·up·down, whose norm
    is Σ (PᵀP) ∘ (down·downᵀ) for P = (I − QQᵀ)·up. Each part is formed as a difference
    first, so the fp32 rounding of the stored factors (~1e-7) is measured, not cancelled."""
    x = torch.cat([d.factor * d.up.double().reshape(d.up.shape[0], -1) for d in deltas], 1)
    y = torch.cat([d.down.double().reshape(d.down.shape[0], -1) for d in deltas], 0)
    q, r = torch.linalg.qr(x)
    up, down = up.double(), down.double()
    coefficients = q.T @ up
    inside = coefficients @ down - r @ y
    outside = up - q @ coefficients
    across = float(((outside.T @ outside) * (down @ down.T)).sum())
    return float((inside * inside).sum()) + max(across, 0.0)


def _check_finite(task: ResizeTask, deltas) -> None:
    """A low-rank sum holding NaN or Inf (factors read with ``--allow-nonfinite``, or scaled
    past fp64's range) has no SVD: refused naming the LoRA tensor, not with LAPACK's error."""
    for patch, delta in zip(task.patches, deltas, strict=True):
        for info, values in (
            (patch.up, delta.factor * delta.up.double()),
            (patch.down, delta.down),
        ):
            if not bool(torch.isfinite(values).all()):
                raise NonFiniteTensor(
                    "holds NaN or Inf",
                    path=info.file,
                    key=info.key,
                    hint="a low-rank sum that is not finite cannot be refactored; fix the LoRA: "
                    "--allow-nonfinite keeps NaN or Inf only in full diffs",
                )


def run_resize_task(
    task: ResizeTask, work_dir: str, fingerprint: dict, allow_nonfinite: bool = False
) -> dict:
    """Refactor (or sum) one target and store the result; returns its completion marker."""
    start = time.perf_counter()
    torch.set_num_threads(1)  # bytes independent of --workers, as extract's tasks
    # Consumed as loaded: a diff is a view of the mapped file, valid only until the next one.
    deltas = load_deltas(task.patches, torch.device("cpu"), allow_nonfinite)
    marker: dict = {"key": task.key, "fingerprint": fingerprint, "shape": list(task.shape)}
    attributes = {}
    if task.kind == "lowrank":
        loaded = list(deltas)  # up/down pairs are copies (load_tensor)
        _check_finite(task, loaded)
        factors = refactor_sum(
            [d.up.reshape(d.up.shape[0], -1) for d in loaded],
            [d.down.reshape(d.down.shape[0], -1) for d in loaded],
            [d.factor for d in loaded],
        )
        arrays = {"up": factors.up, "down": factors.down}
        attributes["up"] = {"singular_values": factors.singular_values.tolist()}
        marker.update(
            kind="lowrank",
            rank=factors.rank,
            sq_norm=factors.sq_norm,
            # measured, so the fp32 rounding of the stored factors counts in every error
            residual_sq=_distance_sq(loaded, factors.up, factors.down),
        )
    else:
        arrays = {"diff": _dense_sum(task, deltas).float()}
        marker.update(kind="diff")
    arrays = {name: a.contiguous().numpy() for name, a in arrays.items()}
    marker["array_shapes"] = {name: list(a.shape) for name, a in arrays.items()}
    marker["seconds"] = round(time.perf_counter() - start, 4)
    WorkDir(work_dir).save(task.key, arrays, marker, attributes)
    return marker
