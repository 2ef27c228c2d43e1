"""The run lock of a work directory: one run at a time, stale locks of dead processes taken
over."""

from __future__ import annotations

import json
import os
import socket
import time

import psutil

from ..errors import WorkDirLocked
from ..io.atomic import remove_quietly


class RunLock:
    """``lock.json`` created exclusively; a lock whose process is gone from this host is taken
    over, one held by a live process (or another host) refuses the run."""

    def __init__(self, work_dir: str):
        self.path = os.path.join(work_dir, "lock.json")
        self.held = False

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise WorkDirLocked("could not take the lock", path=self.path)

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path) as f:
                owner = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            owner = {}
        pid, host = owner.get("pid"), owner.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and psutil.pid_exists(pid):
            raise WorkDirLocked(
                f"another run (pid {pid}) is using this work directory",
                path=os.path.dirname(self.path),
                hint="wait for it, or pass another --work-dir",
            )
        if host not in (None, socket.gethostname()):
            raise WorkDirLocked(
                f"locked by a run on host {host} (pid {pid})",
                path=os.path.dirname(self.path),
                hint=f"if that run is dead, delete {self.path}",
            )
        remove_quietly(self.path)  # stale: its process is gone

    def release(self) -> None:
        if self.held:
            remove_quietly(self.path)
            self.held = False
