"""Running tasks in this process: Dask's threaded scheduler hands every result to ``on_done``
in the calling thread and re-raises a task's own error; a tensor whose workers keep dying is
one line; an in-process cluster shows no dashboard, a distributed one does."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import dask
import pytest

from loraforge.pipeline.errors import ClusterError
from loraforge.pipeline.io.readahead import ReadAhead
from loraforge.pipeline.io.reader import TensorInfo
from loraforge.pipeline.run.cluster import (
    TaskCall,
    dashboard_link,
    dask_client,
    local_threads,
    run_tasks,
    task_result,
)
from loraforge.pipeline.run.gpu import GPU_THREADS


def _scale(value, factor):
    return value * factor


BOOM = ValueError("tensor 'b': bad")


def _fail(value):
    raise BOOM


def _collect(calls, **kwargs):
    done, clusters, threads = [], [], set()

    def on_done(key, result):
        done.append((key, result))
        threads.add(threading.get_ident())

    run_tasks(calls, on_done, device="cpu", on_cluster=clusters.append, **kwargs)
    return done, clusters, threads


@pytest.mark.parametrize("workers", [1, 3])
def test_run_tasks_hands_every_result_to_on_done_in_this_thread(workers):
    calls = [TaskCall(f"scaled-{i}", _scale, (i, 10)) for i in range(7)]
    done, clusters, threads = _collect(calls, workers=workers)
    assert sorted(done) == [(f"scaled-{i}", i * 10) for i in range(7)]  # each call once
    assert clusters == [None]  # no cluster, so no dashboard
    assert threads == {threading.get_ident()}


def test_run_tasks_without_calls_does_nothing():
    assert _collect([], workers=2) == ([], [], set())


def test_run_tasks_reraises_the_task_error():
    calls = [TaskCall("a", _scale, (1, 2)), TaskCall("b", _fail, (3,))]
    calls += [TaskCall(f"c{i}", _scale, (i, 2)) for i in range(3)]
    done = []
    with pytest.raises(ValueError) as raised:
        run_tasks(calls, lambda key, result: done.append(key), workers=2, device="cpu")
    assert raised.value is BOOM  # the task's own exception, not a wrapper
    assert "b" not in done


def test_local_threads_keep_one_gpu_busy_and_every_core_on_cpu(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 40)
    assert local_threads("cpu") == 16  # capped
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert local_threads("cpu") == 3
    assert local_threads("cuda") == local_threads("cuda:1") == GPU_THREADS == 2


@pytest.mark.parametrize("failures, tries", [(3, 4), (0, 1)])
def test_a_tensor_that_keeps_killing_workers_is_one_line(failures, tries):
    from distributed import KilledWorker

    class Dead:
        def result(self):
            raise KilledWorker("lowrank-blocks.0.ffn.0.weight", "tcp://127.0.0.1:1", [])

    with dask.config.set({"distributed.scheduler.allowed-failures": failures}):
        with pytest.raises(ClusterError) as raised:
            task_result(Dead(), "blocks.0.ffn.0.weight")
    assert str(raised.value) == (
        f"tensor 'blocks.0.ffn.0.weight': {tries} workers died while running it (out of "
        "memory, or a crash in a kernel?) (finished tensors are kept; check the worker logs, "
        "then rerun to resume)"
    )
    assert raised.value.exit_code == 1


def test_task_result_passes_a_task_error_through():
    class Failed:
        def result(self):
            raise BOOM

    with pytest.raises(ValueError) as raised:
        task_result(Failed(), "b")
    assert raised.value is BOOM
    assert task_result(SimpleNamespace(result=lambda: 42), "a") == 42


def test_dashboard_link_only_for_a_distributed_cluster():
    link = "http://127.0.0.1:8787/status"
    remote = SimpleNamespace(dashboard_link=link)  # a client of a running scheduler
    assert dashboard_link(remote) == link
    threads = SimpleNamespace(cluster=SimpleNamespace(processes=False), dashboard_link=link)
    assert dashboard_link(threads) is None
    processes = SimpleNamespace(cluster=SimpleNamespace(processes=True), dashboard_link=link)
    assert dashboard_link(processes) == link
    spec = SimpleNamespace(cluster=SimpleNamespace(), dashboard_link=link)  # no such attribute
    assert dashboard_link(spec) == link


def test_in_process_cluster_has_no_dashboard_link():
    with dask_client(workers=2, device="cpu") as client:
        assert dashboard_link(client) is None
        assert sum(client.nthreads().values()) == 2


def _slow_then_flag(flags: list, event):
    event.wait(5)  # started before the failing task raises, still running when it does
    time.sleep(0.3)
    flags.append("finished")
    return "slow"


def _fail_after_start(event):
    event.set()
    raise RuntimeError("bad tensor")


def test_a_failing_task_returns_only_after_the_running_tasks_finish():
    import threading

    from loraforge.pipeline.run.cluster import TaskCall, run_tasks

    flags, started = [], threading.Event()
    calls = [
        TaskCall("slow", _slow_then_flag, (flags, started)),
        TaskCall("bad", _fail_after_start, (started,)),
    ]
    with pytest.raises(RuntimeError, match="bad tensor"):
        run_tasks(calls, lambda key, result: None, workers=2, device="cpu")
    assert flags == ["finished"]  # nothing still writes once run_tasks has returned


def _started(order, key):
    order.append(key)


def test_the_tasks_reads_are_asked_for_in_the_order_the_tasks_start(monkeypatch):
    """The read-ahead follows Dask's own order (dask.order), not the list's: with one worker,
    the files asked for come in the order the tasks started."""
    asked, started = [], []
    monkeypatch.setattr(ReadAhead, "_advise", lambda self, f, o, n: asked.append(f))
    keys = [f"task-{i}" for i in (3, 11, 0, 7, 5, 2, 9)]
    calls = [
        TaskCall(k, _started, (started, k), reads=(TensorInfo(k, f"/m/{k}", "F32", (1,), 0),))
        for k in keys
    ]
    run_tasks(calls, lambda key, result: None, workers=1, device="cpu")
    assert sorted(started) == sorted(keys)
    assert asked == [f"/m/{k}" for k in started]


def test_no_read_ahead_without_reads(monkeypatch):
    made = []
    monkeypatch.setattr(ReadAhead, "__init__", lambda self, *a: made.append(a))
    run_tasks([TaskCall("a", _scale, (1, 2))], lambda key, result: None, workers=1, device="cpu")
    assert made == []
