"""Which device a run's tasks use, decided and checked before any work starts."""

from __future__ import annotations

import torch

from ..errors import UsageError
from .cluster import cluster_device
from .gpu import select_gpus, visible_gpus


def pick_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_device(device: str, *, scheduler: str | None = None, gpus: str | None = None) -> str:
    """The device tasks run on. With ``gpus``, ``cuda`` (each GPU worker sees its own GPU as
    ``cuda``); with a running cluster, the workers' device, not this machine's (``auto``:
    ``cuda`` when its workers declare a GPU)."""
    if gpus is not None:
        if scheduler:
            raise UsageError(
                "--gpus starts local GPU workers and cannot be combined with --scheduler",
                hint="start the cluster's workers one per GPU with --resources GPU=1",
            )
        if device not in ("auto", "cuda"):
            raise UsageError(
                f"--gpus picks the GPUs; --device {device} contradicts it",
                hint="drop --device, or pass --device cuda",
            )
        select_gpus(gpus, visible_gpus())
        return "cuda"
    if scheduler and (device in ("auto", "cpu") or device.startswith("cuda")):
        return cluster_device(scheduler, device)
    resolved = pick_device(device)
    if resolved.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: no CUDA device is visible", hint="use --device cpu or auto"
        )
    if not (resolved == "cpu" or resolved.startswith("cuda")):
        raise UsageError(f"unknown --device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return resolved
