"""Dask clients. Scheduling hints on task specs become Dask resources here and nowhere else."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace

from ..errors import ClusterError, UsageError
from ..io.readahead import ReadAhead, default_window
from .gpu import GPU, GPU_THREADS, gpu_cluster, task_resources
from .memory import gated
from .staging import free_dead_threads


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def _print_warning(message: str) -> None:
    """Where a warning goes when the caller gave no ``on_warning``: one line on stderr, as the
    CLI prints its warnings."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _quiet_logs() -> None:
    # A failing task already reaches the user as one line; distributed would also log it with
    # a traceback ("Compute Failed").
    for name in ("distributed", "distributed.worker", "distributed.scheduler"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def connect(scheduler: str):
    """A client for a running cluster: ``tcp://HOST:PORT`` (or any Dask address) or the path
    of a scheduler file (``dask scheduler --scheduler-file``)."""
    from distributed import Client

    _quiet_logs()
    try:
        if os.path.isfile(scheduler):
            return Client(scheduler_file=scheduler)
        if "://" in scheduler or ":" in scheduler:
            return Client(scheduler)
    except (OSError, TimeoutError) as e:
        raise ClusterError(
            f"cannot reach the Dask scheduler ({e})",
            path=scheduler,
            hint="check the address or scheduler file, and that the scheduler is running",
        ) from None
    raise UsageError(
        f"--scheduler {scheduler}: no such scheduler file, and not an address",
        hint="give tcp://HOST:PORT or the path of a file written by dask scheduler",
    )


def _worker_resources(client) -> list[dict]:
    try:  # some distributed releases list only 5 workers unless asked for all
        info = client.scheduler_info(n_workers=-1)
    except TypeError:
        info = client.scheduler_info()
    return [w.get("resources") or {} for w in info["workers"].values()]


def cluster_device(scheduler: str, device: str) -> str:
    """The device of a run on a running cluster, checked before any work starts: ``auto`` is
    ``cuda`` when its workers declare a GPU; ``cuda`` needs such a worker (``check_cluster``)."""
    client = connect(scheduler)
    try:
        if device == "auto":
            return "cuda" if any(r.get(GPU) for r in _worker_resources(client)) else "cpu"
        check_cluster(client, device)
        return device
    finally:
        client.close()


def check_cluster(client, device: str) -> None:
    """GPU tasks wait for a worker with the GPU resource; say so instead of waiting forever
    when the cluster has workers and none declares one."""
    resources = _worker_resources(client)
    if device.startswith("cuda") and resources and not any(r.get(GPU) for r in resources):
        raise ClusterError(
            f"none of the {len(resources)} workers declares the {GPU} resource, so no tensor "
            "could run on cuda",
            path=client.scheduler.address,
            hint="start one worker per GPU with --resources GPU=1, or pass --device cpu",
        )


def task_result(future, key: str):
    """``future.result()``; a tensor whose workers kept dying (Dask reschedules a task after
    a worker is lost, up to ``distributed.scheduler.allowed-failures`` times) becomes one line.
    A task's own error (a bad tensor) is raised as is: Dask never retries those."""
    from distributed import KilledWorker

    try:
        return future.result()
    except KilledWorker:
        import dask

        tries = dask.config.get("distributed.scheduler.allowed-failures") + 1
        raise ClusterError(
            f"{tries} workers died while running it (out of memory, or a crash in a kernel?)",
            key=key,
            hint="finished tensors are kept; check the worker logs, then rerun to resume",
        ) from None


def dashboard_link(client) -> str | None:
    """The dashboard of a distributed cluster (remote, or worker processes per GPU); None for
    the embedded in-process cluster, whose dashboard nobody asked for."""
    cluster = getattr(client, "cluster", None)
    if cluster is not None and getattr(cluster, "processes", True) is False:
        return None
    return client.dashboard_link


@contextmanager
def dask_client(
    *,
    workers: int | None,
    device: str,
    scheduler: str | None = None,
    gpus: Sequence[str] | None = None,
    on_warning: Callable[[str], None] | None = None,
):
    """A client for ``scheduler`` (an address or a scheduler file); or, with ``gpus`` (their
    ``CUDA_VISIBLE_DEVICES`` entries), a local cluster of one worker process per GPU with
    ``workers`` threads each (default 2, see gpu.py); or an in-process local cluster
    of ``workers`` threads. Threads, not processes, by default: torch releases the GIL in its
    kernels, and the process tree then holds one copy of torch, not one per worker.
    ``on_warning`` gets a line when the GPU cluster is not the one asked for (dask-cuda's)."""
    from distributed import Client, LocalCluster

    _quiet_logs()
    if scheduler:
        client = connect(scheduler)
        try:
            check_cluster(client, device)
            yield client
        finally:
            client.close()
        return
    if gpus:
        cluster, note = gpu_cluster(gpus, workers or GPU_THREADS)
        if note:
            (on_warning or _print_warning)(note)
    else:
        cluster = LocalCluster(
            n_workers=1,
            threads_per_worker=workers or default_workers(),
            processes=False,
            dashboard_address=":0",  # a free port: never collide with another cluster's 8787
            resources={GPU: 1} if device.startswith("cuda") else None,
        )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@dataclass(frozen=True)
class TaskCall:
    """One Dask task: a readable, stable key, the function and its arguments (addresses and
    small option values, never tensors), whether it uses the device, for a GPU task the
    pinned staging it needs (bytes; ``fn`` then takes the keyword ``stage_nbytes``), the
    host memory it allocates (bytes, from the plan), which the memory gate admits, for
    progress the tensor it computes and the bytes it reads, and the stored tensors it reads
    (``reads``: what the in-process scheduler reads ahead, ``io/readahead.py``)."""

    key: str
    fn: Callable
    args: tuple
    uses_gpu: bool = False
    stage_bytes: int = 0
    memory_bytes: int = 0
    tensor: str = ""
    read_bytes: int = 0
    reads: tuple = ()


def run_tasks(
    calls: list[TaskCall],
    on_done: Callable[[str, object], None],
    *,
    workers: int | None,
    device: str,
    scheduler: str | None = None,
    gpus: Sequence[str] | None = None,
    on_cluster: Callable[[str | None], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    max_memory: int | None = None,
) -> None:
    """Run every call on Dask, handing each result to ``on_done(key, result)`` in this thread
    as it finishes; the first failing task's error is raised.

    With ``scheduler`` or ``gpus``: distributed futures on that cluster (``on_cluster`` gets
    its dashboard; ``on_warning`` a line when ``--gpus`` falls back from dask-cuda, printed on
    stderr when not given). Otherwise Dask's threaded scheduler on ``workers`` threads in this
    process: every task spends its time in torch, numpy and file I/O, which release the GIL,
    and an in-process distributed cluster's event loops cost 2 s more of a 17 s extraction on
    two cores.

    ``max_memory``: the bytes the calls running at once may declare, together, per process
    (split between the worker processes of ``gpus``; on a running cluster, per worker)."""
    if not calls:
        return
    calls = with_staging(calls)
    if max_memory is not None:
        share = max_memory // len(gpus) if gpus else max_memory
        calls = with_memory_gate(calls, share)
    if scheduler or gpus:
        with dask_client(
            workers=workers,
            device=device,
            scheduler=scheduler,
            gpus=gpus,
            on_warning=on_warning,
        ) as client:
            if on_cluster:
                on_cluster(dashboard_link(client))
            _run_distributed(client, calls, on_done)
        return
    if on_cluster:
        on_cluster(None)
    _run_threaded(calls, on_done, workers or local_threads(device), max_memory)


def with_staging(calls: list[TaskCall]) -> list[TaskCall]:
    """GPU calls that declare ``stage_bytes`` get the largest over all the calls as the
    keyword ``stage_nbytes``: each worker thread then allocates its pinned buffer once, at that
    size, whatever order the tasks come in."""
    sized = [c for c in calls if c.uses_gpu and c.stage_bytes]
    if not sized:
        return calls
    nbytes = max(c.stage_bytes for c in sized)
    staged = {id(c) for c in sized}
    return [
        replace(c, fn=functools.partial(c.fn, stage_nbytes=nbytes)) if id(c) in staged else c
        for c in calls
    ]


def with_memory_gate(calls: list[TaskCall], budget: int) -> list[TaskCall]:
    """Each call runs once its process's memory gate admits its ``memory_bytes``."""
    return [replace(c, fn=functools.partial(gated, c.fn, c.memory_bytes, budget)) for c in calls]


def local_threads(device: str) -> int:
    """Default threads of the in-process scheduler: the cores on CPU; on one GPU, as many as
    keep it busy (one reads while one computes, see gpu.py)."""
    if device.startswith("cuda"):
        return GPU_THREADS
    return default_workers()


def _run_threaded(
    calls: list[TaskCall], on_done, threads: int, max_memory: int | None = None
) -> None:
    from dask.callbacks import Callback
    from dask.threaded import get

    # functools.partial keeps Dask from walking the arguments for keys.
    graph = {c.key: (functools.partial(c.fn, *c.args),) for c in calls}
    # Our own pool, so a failing task (or Ctrl-C) returns only once the tasks already running
    # have finished: none may still write to the work directory after its lock is released.
    pool = ThreadPoolExecutor(threads)
    try:
        with _reading_ahead(calls, graph, max_memory) as ahead:

            class Finished(Callback):
                def _posttask(self, key, result, dsk, state, worker_id):  # the calling thread
                    if ahead is not None:
                        ahead.finished(key)
                    on_done(key, result)

            with Finished():
                get(graph, list(graph), pool=pool)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        free_dead_threads()  # the pool's reusable buffers go with it


@contextmanager
def _reading_ahead(calls: list[TaskCall], graph: dict, max_memory: int | None):
    """A ``ReadAhead`` of the calls' reads in the order Dask's local scheduler starts them
    (``dask.order``: it pops the ready task of lowest priority first), a quarter of the memory
    budget ahead at most, or None where no call declares reads or the platform has no
    ``posix_fadvise``. Pages read ahead are page cache, which a cgroup's limit counts: the
    budget bounds them too."""
    if not hasattr(os, "posix_fadvise") or not any(c.reads for c in calls):
        yield None
        return
    from dask.order import order

    priority = order(graph)
    plan = [(c.key, c.reads) for c in sorted(calls, key=lambda c: priority[c.key])]
    window = default_window() if max_memory is None else min(default_window(), max_memory // 4)
    with ReadAhead(plan, max(1, window)) as ahead:
        yield ahead


def _run_distributed(client, calls: list[TaskCall], on_done) -> None:
    from distributed import as_completed

    futures = [
        client.submit(c.fn, *c.args, key=c.key, pure=False, resources=task_resources(c.uses_gpu))
        for c in calls
    ]
    try:
        for future in as_completed(futures):
            on_done(future.key, task_result(future, future.key))
    except BaseException:
        client.cancel(futures)
        raise
