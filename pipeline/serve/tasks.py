"""The task queue: records in arrival order, run one at a time, first in first out, with
LightX2V's statuses (``pending``, ``processing``, ``completed``, ``failed``, ``cancelled``).

A cancelled pending task is taken off the queue; a cancelled processing task stops at its next
denoising step and writes nothing (LightX2V marks it cancelled and lets it finish). At most
``max_queue_size`` tasks are pending or processing at once; at most ``KEEP`` finished records
are kept (the oldest go first)."""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from datetime import datetime

from .requests import Plan

KEEP = 1000
ACTIVE = ("pending", "processing")


@dataclass
class Task:
    task_id: str
    plan: Plan
    status: str = "pending"
    start_time: datetime = field(default_factory=datetime.now)
    end_time: datetime | None = None
    error: str | None = None
    error_type: str = ""
    step: int = 0
    frames_sha256: str | None = None
    seconds: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def status_dict(self) -> dict:
        """LightX2V's task status fields, then loraforge's."""
        plan = self.plan
        return {
            "task_id": self.task_id,
            "status": self.status,
            "start_time": self.start_time.isoformat(),
            "end_time": self.end_time.isoformat() if self.end_time else None,
            "error": self.error,
            "error_type": self.error_type,
            "save_result_path": plan.save_result_path,
            "progress": {"step": self.step, "steps": plan.job.settings.steps},
            "seed": plan.job.seed,
            "loras": plan.requested,
            "ignored_fields": plan.ignored,
            "frames_sha256": self.frames_sha256,
            "seconds": self.seconds,
        }


class Full(Exception):
    """The queue holds ``max_queue_size`` active tasks: a request may retry later (503)."""


class DuplicateTask(Exception):
    """A request's ``task_id`` names a task the server holds: it can never be queued (409)."""


class TaskManager:
    def __init__(self, max_queue_size: int):
        self.max_queue_size = max_queue_size
        self.lock = threading.Condition()
        self.tasks: OrderedDict[str, Task] = OrderedDict()
        self.queue: deque[str] = deque()
        self.current: str | None = None
        self.counts = {"total": 0, "completed": 0, "failed": 0}
        self.stopping = False

    def add(self, task: Task) -> None:
        with self.lock:
            if task.task_id in self.tasks:
                raise DuplicateTask(f"Task ID {task.task_id} already exists: give another task_id")
            if self.active() >= self.max_queue_size:
                raise Full(f"Task queue is full (max {self.max_queue_size} tasks)")
            self.tasks[task.task_id] = task
            self.queue.append(task.task_id)
            self.counts["total"] += 1
            self._forget_old()
            self.lock.notify_all()

    def next(self) -> Task | None:
        """The next pending task, now processing; None once stopping (the worker's loop)."""
        with self.lock:
            while not self.stopping and not self.queue:
                self.lock.wait()
            if self.stopping:
                return None
            task = self.tasks[self.queue.popleft()]
            task.status, task.start_time = "processing", datetime.now()
            self.current = task.task_id
            return task

    def finish(self, task: Task, status: str, error: BaseException | None = None) -> None:
        """Record how ``task`` ended, unless it was cancelled meanwhile."""
        with self.lock:
            self.current = None
            task.end_time = task.end_time or datetime.now()
            if task.status == "cancelled":
                return
            task.status = status
            if error is not None:
                task.error, task.error_type = str(error), type(error).__name__
            self.counts[status] = self.counts.get(status, 0) + 1

    def cancel(self, task_id: str) -> bool:
        """True when a pending or processing task was cancelled."""
        with self.lock:
            task = self.tasks.get(task_id)
            if task is None or task.status not in ACTIVE:
                return False
            if task.status == "pending":
                self.queue.remove(task_id)
            task.cancel.set()
            task.status, task.end_time = "cancelled", datetime.now()
            task.error = "Task cancelled by user"
            return True

    def stop(self) -> None:
        """Cancel every active task and wake the worker to end."""
        with self.lock:
            for task_id in [t for t, task in self.tasks.items() if task.status in ACTIVE]:
                self.cancel(task_id)
            self.stopping = True
            self.lock.notify_all()

    def active(self) -> int:
        return sum(1 for task in self.tasks.values() if task.status in ACTIVE)

    def get(self, task_id: str) -> Task | None:
        with self.lock:
            return self.tasks.get(task_id)

    def _forget_old(self) -> None:
        finished = [t for t, task in self.tasks.items() if task.status not in ACTIVE]
        for task_id in finished[: max(0, len(self.tasks) - KEEP)]:
            del self.tasks[task_id]
