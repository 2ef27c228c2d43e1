"""The one thread that owns the model: it takes tasks off the queue in order, switches the
LoRAs to the task's (each touched weight recomputed from its original, re-read from the model's
checkpoint: no second copy), denoises with the task's seed and settings, and writes the mp4
under a temporary name, renamed when complete. A failure fails that task only; after a failed
switch the weights are back at the base's bytes. ``model_lock`` is held while the model is used,
so a weights digest (service status) never sees a switch half-done."""

from __future__ import annotations

import logging
import threading
import time

from ..runtime.generate import Runtime
from ..runtime.video import VideoOutput
from .tasks import Task, TaskManager

log = logging.getLogger("loraforge.serve")


class Cancelled(Exception):
    """Raised at a denoising step's end when the task was cancelled."""


class Worker(threading.Thread):
    def __init__(self, runtime: Runtime, tasks: TaskManager):
        super().__init__(name="loraforge-worker", daemon=True)
        self.runtime, self.tasks = runtime, tasks
        self.model_lock = threading.Lock()

    def run(self) -> None:
        while (task := self.tasks.next()) is not None:
            self.process(task)

    def process(self, task: Task) -> None:
        started = time.perf_counter()
        output = VideoOutput(task.plan.output)
        try:
            with self.model_lock:
                self.runtime.switch(task.plan.loras)
                generated = self.runtime.generate(task.plan.job, self._on_step(task))
            task.frames_sha256 = generated.digest
            output.write(generated.frames, task.plan.job.settings.fps)
            if task.cancel.is_set():
                raise Cancelled()
            output.seal()
            output.publish()
        except Cancelled:
            output.abort()
            self.tasks.finish(task, "cancelled")
        except Exception as e:  # noqa: BLE001 - a task's failure must not stop the server
            output.abort()
            log.warning("task %s failed: %s: %s", task.task_id, type(e).__name__, e)
            self.tasks.finish(task, "failed", e)
        else:
            task.seconds = round(time.perf_counter() - started, 3)
            self.tasks.finish(task, "completed")

    @staticmethod
    def _on_step(task: Task):
        def on_step(index: int, timestep: float, seconds: float) -> None:
            task.step = index + 1
            if task.cancel.is_set():
                raise Cancelled()

        return on_step

    def weights_digest(self) -> str:
        with self.model_lock:
            return self.runtime.digest()
