"""Which device a run's tasks use, decided and checked before any work starts."""

from __future__ import annotations

import re

import torch

from ..errors import UsageError
from .cluster import cluster_device
from .gpu import select_gpus, visible_gpus

_VALID = "valid: auto, cpu, cuda, cuda:N"


def pick_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_type(device: str) -> str:
    """``cpu`` or ``cuda``: what decides a kernel's random stream and rounding, without the GPU
    index (every GPU of one type is assumed to compute the same bytes)."""
    return device.split(":", 1)[0]


def gpu_index(device: str) -> int | None:
    """N of ``cuda:N`` (None for ``cuda`` and every other device); a malformed index is
    refused in one line."""
    if not device.startswith("cuda:"):
        return None
    match = re.fullmatch(r"cuda:(\d+)", device)
    if match is None:
        raise UsageError(
            # quoted: the console renders :name: as an emoji (cuda:x: would print a cross)
            f"--device {device!r}: {device[5:]!r} is not a GPU index; {_VALID} (N = 0, 1, ...)"
        )
    return int(match.group(1))


def resolve_device(device: str, *, scheduler: str | None = None, gpus: str | None = None) -> str:
    """The device tasks run on. With ``gpus``, ``cuda`` (each GPU worker sees its own GPU as
    ``cuda``); with a running cluster, the workers' device, not this machine's (``auto``:
    ``cuda`` when its workers declare a GPU). ``cuda:N`` must name a GPU visible here, and is
    refused with a cluster: its workers are one per GPU and each sees its GPU as ``cuda``."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"unknown --device {device!r}; {_VALID}")
    index = gpu_index(device)
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
    if scheduler:
        if index is not None:
            raise UsageError(
                f"--device {device} cannot be used with --scheduler: the cluster's workers are "
                "one per GPU and each sees its own GPU as cuda",
                hint="pass --device cuda",
            )
        return cluster_device(scheduler, device)
    resolved = pick_device(device)
    if resolved.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: no CUDA device is visible", hint="use --device cpu or auto"
        )
    if index is not None:
        count = torch.cuda.device_count()
        if index >= count:
            others = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise UsageError(
                f"--device {device}: no GPU {index}; {count} visible",
                hint=f"use --device cuda or {others}",
            )
    return resolved


DEVICE_FRACTION = 0.8  # of a GPU's free memory one task may plan to use


def usable_device_memory(device) -> int:
    """Bytes of ``device``'s (a GPU's) free memory a task may plan to fill: the rest is left
    to the caching allocator's rounding and to the other worker thread's staging."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_FRACTION)
