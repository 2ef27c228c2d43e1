"""The queue and the worker, with a stand-in model: first in first out, a full queue and a
duplicate id refused, a cancelled pending task never runs, a cancelled running task stops at
its next step and writes nothing, a failed task leaves the worker serving."""

import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")

from loraforge.pipeline.runtime.settings import Settings  # noqa: E402
from loraforge.pipeline.serve.requests import Plan  # noqa: E402
from loraforge.pipeline.serve.tasks import DuplicateTask, Full, Task, TaskManager  # noqa: E402
from loraforge.pipeline.serve.worker import Worker  # noqa: E402


class StandIn:
    """Generates ``steps`` steps of 1x16x16 frames; ``hold`` pauses it after a given step."""

    def __init__(self):
        self.ran, self.hold, self.paused = [], {}, threading.Event()

    def switch(self, loras):
        if loras == "bad":
            raise ValueError("cannot switch")

    def generate(self, job, on_step):
        self.ran.append(job.prompt)
        for step in range(job.settings.steps):
            if (job.prompt, step) in self.hold:
                self.paused.set()
                self.hold[(job.prompt, step)].wait(10)
            on_step(step, 1000.0 - step, 0.0)
        frames = np.zeros((1, 16, 16, 3), np.float32)
        return SimpleNamespace(frames=frames, digest=job.prompt)


def task(tmp_path, name, steps=3, loras=None):
    job = SimpleNamespace(prompt=name, settings=Settings(infer_steps=steps), seed=0)
    plan = Plan(job, loras or {}, [], str(tmp_path / f"{name}.mp4"), f"{name}.mp4")
    return Task(name, plan)


def wait_until(done, seconds: float = 10) -> None:
    """Poll ``done`` until it holds; fail after ``seconds`` instead of hanging."""
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, f"still waiting after {seconds} s"
        time.sleep(0.02)


def test_fifo_limits_cancel_and_failures(tmp_path):
    model, tasks = StandIn(), TaskManager(max_queue_size=3)
    worker = Worker(model, tasks)
    release = threading.Event()
    model.hold[("first", 1)] = release
    for name, loras in (("first", None), ("broken", "bad"), ("dropped", None)):
        tasks.add(task(tmp_path, name, loras=loras))
    with pytest.raises(Full) as caught:
        tasks.add(task(tmp_path, "fourth"))
    assert str(caught.value) == "Task queue is full (max 3 tasks)"
    thread = threading.Thread(target=worker.run, daemon=True)  # a failed test must not hang
    thread.start()
    assert model.paused.wait(10)  # first is at its step 1
    assert tasks.cancel("dropped") and tasks.get("dropped").status == "cancelled"
    with pytest.raises(DuplicateTask) as caught:
        tasks.add(task(tmp_path, "first"))
    assert str(caught.value) == "Task ID first already exists: give another task_id"
    tasks.add(task(tmp_path, "last"))
    release.set()
    wait_until(lambda: tasks.get("last").status not in ("pending", "processing"))
    tasks.stop()
    thread.join(10)
    assert model.ran == ["first", "last"]  # broken failed at its switch, dropped never ran
    statuses = {t: tasks.get(t).status for t in ("first", "broken", "dropped", "last")}
    assert statuses == {
        "first": "completed",
        "broken": "failed",
        "dropped": "cancelled",
        "last": "completed",
    }
    broken = tasks.get("broken").status_dict()
    assert (broken["error"], broken["error_type"]) == ("cannot switch", "ValueError")
    assert sorted(os.listdir(tmp_path)) == ["first.mp4", "last.mp4"]
    assert tasks.counts == {"total": 4, "completed": 2, "failed": 1}


def test_a_running_task_cancelled_stops_at_its_next_step_and_writes_nothing(tmp_path):
    model, tasks = StandIn(), TaskManager(max_queue_size=2)
    release = threading.Event()
    model.hold[("long", 2)] = release
    tasks.add(task(tmp_path, "long", steps=50))
    thread = threading.Thread(target=Worker(model, tasks).run, daemon=True)
    thread.start()
    assert model.paused.wait(10)
    assert tasks.get("long").status == "processing"
    assert tasks.cancel("long")
    release.set()
    wait_until(lambda: tasks.current is None)
    tasks.stop()
    thread.join(10)
    long = tasks.get("long")
    assert (long.status, long.step, long.error) == ("cancelled", 3, "Task cancelled by user")
    assert os.listdir(tmp_path) == []
    assert not tasks.cancel("long")  # do_nothing: already ended
