"""The memory gate: tasks run together only while their declared bytes fit the budget, and the
reusable buffers idle threads hold are counted, then freed to make room."""

import threading
import time

import torch

from loraforge.pipeline.run import memory, staging
from loraforge.pipeline.run.cluster import TaskCall, run_tasks
from loraforge.pipeline.run.memory import MemoryGate, cgroup_available, default_budget

MiB = 2**20


def _recording(log: list, lock: threading.Lock, running: list):
    def task(name: str, nbytes: int) -> str:
        with lock:
            running.append(nbytes)
            log.append(sum(running))
        time.sleep(0.05)
        with lock:
            running.remove(nbytes)
        return name

    return task


def test_running_tasks_never_declare_more_than_the_budget_together():
    log, running, lock = [], [], threading.Lock()
    task = _recording(log, lock, running)
    sizes = [60, 50, 30, 30, 20, 90, 10, 40]
    calls = [TaskCall(f"t{i}", task, (f"t{i}", n), memory_bytes=n) for i, n in enumerate(sizes)]
    done = {}
    run_tasks(calls, done.__setitem__, workers=4, device="cpu", max_memory=100)
    assert sorted(done) == [f"t{i}" for i in range(8)]
    assert max(log) <= 100
    assert max(log) > 60  # and tasks did run side by side


def test_a_task_larger_than_the_budget_runs_alone():
    log, running, lock = [], [], threading.Lock()
    task = _recording(log, lock, running)
    calls = [TaskCall("big", task, ("big", 500), memory_bytes=500)] + [
        TaskCall(f"s{i}", task, (f"s{i}", 10), memory_bytes=10) for i in range(3)
    ]
    done = {}
    run_tasks(calls, done.__setitem__, workers=3, device="cpu", max_memory=100)
    assert len(done) == 4
    assert 500 in log and all(total == 500 for total in log if total >= 500)


def test_idle_threads_buffers_are_counted_then_freed_for_a_task_that_needs_the_room():
    gate = MemoryGate(budget=10 * MiB)
    held = threading.Event()
    release = threading.Event()

    def hold_buffer():
        with gate.admit(8 * MiB):
            staging.thread_buffer((2 * MiB,), torch.float32, "cpu", "delta")  # 8 MiB
        held.set()
        release.wait(5)

    other = threading.Thread(target=hold_buffer)
    other.start()
    held.wait(5)
    assert staging.buffer_bytes(other.ident) == 8 * MiB
    with gate.admit(6 * MiB):  # 8 + 6 > 10: the idle thread's buffer is freed first
        assert staging.buffer_bytes(other.ident) == 0
    release.set()
    other.join()


def test_a_thread_keeps_its_buffer_while_it_fits():
    gate = MemoryGate(budget=100 * MiB)
    with gate.admit(8 * MiB):
        staging.thread_buffer((2 * MiB,), torch.float32, "cpu", "delta")
    me = threading.get_ident()
    assert staging.buffer_bytes(me) == 8 * MiB
    staging.free_buffers(me)
    assert staging.buffer_bytes(me) == 0


def test_the_buffers_of_a_finished_runs_threads_are_freed():
    def task():
        staging.thread_buffer((MiB,), torch.float32, "cpu", "delta")
        return threading.get_ident()

    idents = {}
    run_tasks([TaskCall("a", task, ())], idents.__setitem__, workers=1, device="cpu")
    assert idents["a"] not in staging.buffer_threads()


def test_the_default_budget_is_a_fraction_of_what_is_available():
    import psutil

    assert default_budget() <= psutil.virtual_memory().available
    limited = cgroup_available()
    assert limited is None or default_budget() <= limited


def test_cgroup_limits_are_read_once_for_the_limit_and_what_is_left(tmp_path, monkeypatch):
    """v1 and v2 files, an unlimited level ("max", v1's huge number) skipped; the tightest
    wins, and what is left does not count the reclaimable page cache."""
    levels = {
        "v2": {"memory.max": "8000", "memory.current": "5000", "memory.stat": "inactive_file 1000"},
        "v1": {"memory.limit_in_bytes": "6000", "memory.usage_in_bytes": "1000"},
        "open-v2": {"memory.max": "max", "memory.current": "100"},
        "open-v1": {"memory.limit_in_bytes": str(1 << 62)},
    }
    for name, files in levels.items():
        (tmp_path / name).mkdir()
        for file, text in files.items():
            (tmp_path / name / file).write_text(text + "\n")
    monkeypatch.setattr(memory, "_cgroup_dirs", lambda: [str(tmp_path / n) for n in levels])
    assert memory.cgroup_limit() == 6000
    assert memory.cgroup_available() == 4000  # v2: 8000 - (5000 - 1000); v1: 6000 - 1000
