"""What one Dask task does to one tensor. Tasks receive addresses (plan entries holding file
paths and keys) and open the checkpoints themselves; only small dicts travel back."""

from __future__ import annotations

import time

import torch

from loraforge.stages import get_stage, is_unchanged

from .errors import NonFiniteTensor
from .options import KernelOptions
from .plan import ExtractTask
from .reader import mapped
from .workdir import WorkDir


def pick_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _delta(task: ExtractTask, device: torch.device) -> torch.Tensor:
    diff = get_stage("diff")
    with mapped(task.source) as base, mapped(task.target) as target:
        if device.type != "cpu":
            base, target = base.to(device), target.to(device)
        delta = diff(base, target)
        if not bool(torch.isfinite(delta).all()):
            bad = task.target if not bool(torch.isfinite(target).all()) else task.source
            raise NonFiniteTensor(
                "holds NaN or Inf, so the delta is not finite",
                path=bad.file,
                key=task.key,
                hint="fix or re-save the checkpoint",
            )
    return delta


def run_extract_task(
    task: ExtractTask, work_dir: str, device: str, kernel: KernelOptions, fingerprint: dict
) -> dict:
    """Diff, factor or keep, and store one tensor's fp32 result in the work directory.

    Returns the completion marker (also written to disk after the arrays)."""
    start = time.perf_counter()
    dev = torch.device(device)
    delta = _delta(task, dev)
    marker = {"key": task.key, "fingerprint": fingerprint, "shape": list(task.shape)}
    arrays = {}
    if is_unchanged(delta):
        marker["kind"] = "unchanged"
    elif task.kind == "lowrank":
        factors = get_stage("lowrank")(
            delta,
            task.rank,
            name=task.key,
            method=kernel.method,
            oversample=kernel.oversample,
            n_iter=kernel.n_iter,
        )
        arrays = {"up": factors.up, "down": factors.down, "s": factors.singular_values}
        marker.update(
            kind="lowrank", rank=factors.rank, sq_norm=factors.sq_norm, kernel=kernel.to_dict()
        )
    else:
        arrays = {"diff": delta}
        marker.update(kind="diff")
    del delta
    arrays = {name: a.cpu().numpy() for name, a in arrays.items()}
    marker["array_shapes"] = {name: list(a.shape) for name, a in arrays.items()}
    marker["seconds"] = round(time.perf_counter() - start, 4)
    WorkDir(work_dir).save(task.key, arrays, marker)
    return marker
