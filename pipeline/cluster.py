"""Dask clients. Scheduling hints on task specs become Dask resources here and nowhere else."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

GPU = "GPU"


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def task_resources(uses_gpu: bool) -> dict[str, int] | None:
    """A GPU task holds one unit of its worker's GPU resource: one kernel per device at a time."""
    return {GPU: 1} if uses_gpu else None


@contextmanager
def dask_client(*, workers: int | None, device: str, scheduler: str | None = None):
    """A client for ``scheduler`` (an address or a scheduler file), or an in-process local
    cluster of ``workers`` threads. Threads, not processes: torch releases the GIL in its
    kernels, and the process tree then holds one copy of torch, not one per worker."""
    from distributed import Client, LocalCluster

    # A failing task already reaches the user as one line; distributed would also log it with
    # a traceback ("Compute Failed").
    for name in ("distributed", "distributed.worker", "distributed.scheduler"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if scheduler:
        if os.path.isfile(scheduler):
            client = Client(scheduler_file=scheduler)
        else:
            client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    threads = workers or default_workers()
    resources = {GPU: 1} if device.startswith("cuda") else None
    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=threads,
        processes=False,
        dashboard_address=":0",  # a free port: never collide with another cluster's 8787
        resources=resources,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
