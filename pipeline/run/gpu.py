"""GPUs: which devices a ``--gpus`` run uses and the Dask worker behind each. The task side
(per-device lock, pinned staging) is ``staging.py``.

Design. Each GPU gets one worker process pinned to it by ``CUDA_VISIBLE_DEVICES`` (so a task's
``cuda`` is that GPU) that declares the Dask resource ``GPU: 1`` and runs two threads. A GPU
task asks for half of it (``task_resources``), so at most two tensors are in flight
per GPU. Inside the task the read, the mmap → host copy that faults the checkpoint's pages in
from disk, happens *before* ``device_lock``; the lock covers host → device copy, kernel and
device → host copy; saving the result (zarr, or the merge's ``pwrite``) happens after it. One
thread's kernel therefore runs while the other thread reads its next tensor or saves its last
one, and each GPU runs one kernel at a time. Tasks still carry only addresses: the read is
the task's own first step, not a separate Dask task whose tensor would travel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch

from ..errors import UsageError

GPU = "GPU"  # the Dask resource a GPU worker declares
# A GPU task holds half of its worker's GPU: two tensors in flight per GPU, one in the kernel
# (serialised by ``staging.device_lock``), one being read or saved.
GPU_SHARE = 0.5
GPU_THREADS = 2  # per GPU worker: one tensor in the kernel, one being read or saved


# ---- client side: which GPUs, and one worker per GPU ----
def visible_gpus() -> list[str]:
    """The ``CUDA_VISIBLE_DEVICES`` entry of each GPU this process sees, by torch index."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in listed.split(",") if d.strip()][:count]


def select_gpus(spec: str, visible: Sequence[str]) -> list[str]:
    """``--gpus all`` or ``--gpus 0,2`` (torch indices, as in ``cuda:N``) → the
    ``CUDA_VISIBLE_DEVICES`` entry for each chosen GPU. Pure: ``visible`` is ``visible_gpus()``."""
    if not visible:
        raise UsageError(
            f"--gpus {spec}: no CUDA device is visible", hint="drop --gpus, or use --device cpu"
        )
    text = spec.strip().lower()
    if text == "all":
        return list(visible)
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(
            f"cannot read --gpus {spec!r}; write all, or GPU indices such as 0,1"
        ) from None
    if len(set(indices)) != len(indices):
        raise UsageError(f"--gpus {spec}: a GPU is listed twice")
    bad = [i for i in indices if not 0 <= i < len(visible)]
    if bad:
        raise UsageError(
            f"--gpus {spec}: no GPU {bad[0]}; {len(visible)} visible (0-{len(visible) - 1})"
        )
    return [visible[i] for i in indices]


def gpu_worker_specs(devices: Sequence[str], threads: int = GPU_THREADS) -> dict[str, dict]:
    """``SpecCluster`` worker specs: one nanny-managed process per GPU, pinned to it by
    ``CUDA_VISIBLE_DEVICES`` and declaring the resource ``GPU: 1``. ``memory_limit=0``: the
    tasks bound their own memory (tensors in flight), and the nanny must not kill a worker
    whose mapped checkpoint pages count towards its RSS. Pure data, so it is unit-tested."""
    return {
        f"gpu-{device}": {
            "cls": "distributed.Nanny",
            "options": {
                "nthreads": threads,
                "resources": {GPU: 1},
                "env": {"CUDA_VISIBLE_DEVICES": device},
                "host": "127.0.0.1",  # a local cluster: listen on loopback only
                "memory_limit": 0,
                "silence_logs": logging.CRITICAL,
            },
        }
        for device in devices
    }


def gpu_cluster(devices: Sequence[str], threads: int = GPU_THREADS):
    """A local cluster of one worker process per GPU and a note: dask-cuda's
    ``LocalCUDACluster`` when it imports and starts (note ``None``), else a ``SpecCluster`` of
    ``gpu_worker_specs`` and one line saying what fell back and why (``run_tasks`` shows it as
    a warning: a broken dask-cuda must not pass silently for the plain cluster)."""
    try:
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(
            CUDA_VISIBLE_DEVICES=list(devices),
            threads_per_worker=threads,
            resources={GPU: 1},
            memory_limit=0,
            dashboard_address=":0",
            silence_logs=logging.CRITICAL,
        )
        return cluster, None
    except Exception as e:  # noqa: BLE001 - any failure: say which, then the plain cluster
        note = fallback_note(e)
    from distributed import SpecCluster

    cluster = SpecCluster(
        workers=gpu_worker_specs(devices, threads),
        scheduler={
            "cls": "distributed.Scheduler",
            "options": {"host": "127.0.0.1", "dashboard_address": ":0"},
        },
        silence_logs=logging.CRITICAL,
        name="loraforge-gpus",
    )
    return cluster, note


def fallback_note(error: BaseException) -> str:
    """One line: why dask-cuda's cluster was not used, and what runs instead."""
    if isinstance(error, ModuleNotFoundError) and error.name == "dask_cuda":
        why = "dask-cuda is not installed (pip install 'loraforge[gpu]')"
    elif isinstance(error, ImportError):
        why = f"dask-cuda failed to import ({type(error).__name__}: {error})"
    else:
        why = f"dask-cuda's LocalCUDACluster failed to start ({type(error).__name__}: {error})"
    why = " ".join(why.split())  # one line, whatever the message held
    return f"--gpus: {why}; running one nanny worker per GPU instead"


def task_resources(uses_gpu: bool) -> dict[str, float] | None:
    """A GPU task needs a worker that declares a GPU and holds ``GPU_SHARE`` of it; workers
    without the resource (CPU-only workers of a mixed cluster) never get one."""
    return {GPU: GPU_SHARE} if uses_gpu else None
