"""One run of one command: the set-up and bookkeeping every command shares, so a command keeps
only what is its own (what to plan, what a task does, what the report says per tensor).

A session resolves the output path and device and checks them before any work, holds the work
directory's lock, refuses a work directory another command left, sends progress events, runs
task calls on Dask, and writes the report."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import WorkDirConflict
from ..io.layout import output_path
from ..workdir import RunLock, WorkDir
from .cluster import TaskCall, run_tasks
from .device import resolve_device
from .gpu import select_gpus, visible_gpus
from .options import RunOptions
from .paths import check_not_an_input, check_output_location
from .report import save_report

Progress = Callable[[str, dict], None]


def _no_progress(event: str, info: dict) -> None:
    pass


@dataclass
class Session:
    command: str
    run: RunOptions
    output: str  # absolute, with the format's suffix
    device: str  # where tasks compute: cpu, cuda or cuda:N
    gpus: list[str] | None  # CUDA_VISIBLE_DEVICES entries of --gpus workers
    work: WorkDir
    emit: Progress = _no_progress
    started: float = field(default_factory=time.time)

    @classmethod
    def open(
        cls,
        command: str,
        run: RunOptions,
        output: str,
        output_format: str,
        progress: Progress | None = None,
    ) -> Session:
        """Resolve and check the output location and the device: the checks that need no
        input, so a bad option fails before any checkpoint is opened."""
        started = time.time()
        output = output_path(output, output_format)
        check_output_location(output)
        device = resolve_device(run.device, scheduler=run.scheduler, gpus=run.gpus)
        gpus = select_gpus(run.gpus, visible_gpus()) if run.gpus else None
        work = WorkDir(run.work_dir or output + ".work")
        return cls(command, run, output, device, gpus, work, progress or _no_progress, started)

    @property
    def report_path(self) -> str:
        return os.path.abspath(self.run.report or os.path.splitext(self.output)[0] + ".report.json")

    def check_outputs(self, outputs: Iterable[str], inputs: Iterable[str]) -> None:
        """Refuse outputs that would overwrite an input file."""
        check_not_an_input(outputs, inputs)

    @contextmanager
    def locked(self) -> Iterator[dict | None]:
        """Hold the work directory's lock for the block; yields the manifest of the run that
        used it last (None for a new directory). A directory left by another command is
        refused: its intermediates mean something else."""
        lock = RunLock(self.work.path)
        lock.acquire()
        try:
            previous = self.work.read_manifest()
            owner = previous.get("command", "extract") if previous else None
            if owner not in (None, self.command):
                raise WorkDirConflict(
                    f"work directory was left by loraforge {owner}, not {self.command}",
                    path=self.work.path,
                    hint="pass another --work-dir",
                )
            yield previous
        finally:
            lock.release()

    def start(
        self, *, tensors: int, total_bytes: int, done: int, done_bytes: int, changes: list[str]
    ) -> None:
        """The ``start`` event: totals, what is already done (resumed) and why not more."""
        self.emit(
            "start",
            {
                "tensors": tensors,
                "bytes": total_bytes,
                "done": done,
                "done_bytes": done_bytes,
                "changes": changes,
                "work_dir": self.work.path,
            },
        )

    def compute(self, calls: list[TaskCall], on_done: Callable[[str, object], None]) -> None:
        """Run ``calls`` where the options say (threads here, ``--gpus`` workers or a running
        cluster); ``on_done(key, result)`` gets each result in this thread."""
        run_tasks(
            calls,
            on_done,
            workers=self.run.workers,
            device=self.device,
            scheduler=self.run.scheduler,
            gpus=self.gpus,
            on_cluster=lambda link: self.emit("cluster", {"dashboard": link}),
        )

    def finish(self, report: dict) -> dict:
        """Save ``report`` (its summary learns where) and return it."""
        report["summary"]["report"] = self.report_path
        save_report(self.report_path, report)
        return report
