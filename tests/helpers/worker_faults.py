"""Test-only fault injection for Dask workers, kept out of the package.

``KillWorkerOnce`` is a Dask worker plugin: the first worker process that starts executing the
task with Dask key ``key`` SIGKILLs itself, exactly like ``kill -9`` of that worker from outside
at that moment, without racing the clock. A token file created with O_EXCL makes it happen
once per test, however many workers pick the task up afterwards. Workers import this module
by name, so they need the repository root on PYTHONPATH."""

from __future__ import annotations

import os
import signal

from distributed import WorkerPlugin


class KillWorkerOnce(WorkerPlugin):
    name = "loraforge-test-kill-worker-once"

    def __init__(self, key: str, token: str):
        self.key = key
        self.token = token

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or key != self.key:
            return
        try:
            fd = os.open(self.token, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
