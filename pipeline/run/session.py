"""One run of one command: the set-up and bookkeeping every command shares, so a command keeps
only what is its own (what to plan, what a task does, what the report says per tensor).

A session resolves the output path and device and checks every path before any work, holds the
work directory's lock, refuses a work directory it may not use, sends progress events, runs
task calls on Dask, and publishes the output and report together."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import ClusterError, LoraforgeError, WorkDirConflict
from ..io.atomic import (
    remove_quietly,
    strict_json,
    temporary_name,
    write_json,
    write_json_to,
)
from ..io.layout import output_candidates, output_path
from ..workdir import RunLock, WorkDir
from ..workdir.clean import leftover_temporaries
from .cluster import TaskCall, run_tasks
from .device import resolve_device
from .faults import maybe_crash
from .gpu import select_gpus, visible_gpus
from .memory import check_budget, default_budget
from .options import RunOptions
from .paths import (
    UserPath,
    check_output_argument,
    check_path_argument,
    check_paths,
    check_writable_location,
)

Progress = Callable[[str, dict], None]


def _no_progress(event: str, info: dict) -> None:
    pass


def _resources(run: RunOptions) -> tuple[str, list[str] | None, int]:
    """What every run computes with, checked before any input is read: the device, the
    ``--gpus`` workers' GPUs and the memory budget."""
    device = resolve_device(run.device, scheduler=run.scheduler, gpus=run.gpus)
    gpus = select_gpus(run.gpus, visible_gpus()) if run.gpus else None
    check_budget(run.max_memory, run.scheduler)
    return device, gpus, run.max_memory or default_budget()


@dataclass
class Session:
    command: str
    run: RunOptions
    output: str  # absolute, with the format's suffix
    device: str  # where tasks compute: cpu, cuda or cuda:N
    gpus: list[str] | None  # CUDA_VISIBLE_DEVICES entries of --gpus workers
    work: WorkDir | None  # None: a read-only run (verify)
    emit: Progress = _no_progress
    started: float = field(default_factory=time.time)
    given_output: str = ""  # --output as typed (absolute), before the suffix rule
    budget: int = 0  # bytes the running tasks may hold together (--max-memory or default)
    outputs: list[str] = field(default_factory=list)  # written beside --output (check_paths)
    output_option: str = "--output"  # what the command calls its output (convert: OUT, infer)
    writers: list = field(default_factory=list)  # the run's outputs, published together
    done: int = 0  # tensors already done when the run started (reused): counted by compute
    _discard: bool = False

    @classmethod
    def open(
        cls,
        command: str,
        run: RunOptions,
        output: str,
        output_format: str,
        progress: Progress | None = None,
        output_option: str = "--output",
    ) -> Session:
        """Resolve and check the output location (``output_option``: what the command calls
        it) and the device: the checks that need no input, so a bad option fails before any
        checkpoint is opened."""
        started = time.time()
        check_output_argument(output, output_option)
        check_path_argument(run.report, "--report")
        check_path_argument(run.work_dir, "--work-dir")
        given = os.path.abspath(os.path.expanduser(output))
        output = output_path(output, output_format)
        check_writable_location(output, output_option)
        device, gpus, budget = _resources(run)
        work = WorkDir(run.work_dir or output + ".work")
        session = cls(
            command,
            run,
            output,
            device,
            gpus,
            work,
            progress or _no_progress,
            started,
            given,
            budget,
            output_option=output_option,
        )
        check_writable_location(session.report_path, "--report")
        return session

    @classmethod
    def open_read_only(
        cls, command: str, run: RunOptions, progress: Progress | None = None
    ) -> Session:
        """A run that writes nothing but, with ``--report``, its report (``verify``): device,
        workers and memory budget as for every command; no output, no work directory
        (``work`` is None)."""
        started = time.time()
        check_path_argument(run.report, "--report")
        device, gpus, budget = _resources(run)
        emit = progress or _no_progress
        session = cls(command, run, "", device, gpus, None, emit, started, "", budget)
        if run.report:
            check_writable_location(session.report_path, "--report")
        return session

    @property
    def report_path(self) -> str:
        return os.path.abspath(self.run.report or os.path.splitext(self.output)[0] + ".report.json")

    def check_paths(self, inputs: Iterable[UserPath], outputs: Iterable[str] = ()) -> None:
        """Before any work: no path this run writes (output, its index and shards, report,
        work directory) is an input or another written path. ``outputs``: further output
        files of the run beside ``--output`` (``extract --rank 16,32``: one per rank)."""
        self.outputs = list(outputs)
        if self.work is None:  # a read-only run writes its report, if asked for, alone
            if self.run.report:
                check_paths([UserPath("--report", self.report_path)], inputs, None)
            return
        written = [
            UserPath(self.output_option, file)
            for output in (self.output, *outputs)
            for file in output_candidates(output)
        ]
        if self.given_output != self.output:  # the path as typed, before the suffix rule
            written.append(UserPath(self.output_option, self.given_output))
        written.append(UserPath("--report", self.report_path))
        check_paths(written, inputs, UserPath("--work-dir", self.work.path))

    @contextmanager
    def locked(self) -> Iterator[dict | None]:
        """Hold the work directory's lock for the block; yields the manifest of the run that
        used it last (None for a new directory). A directory loraforge did not make, or one
        left by another command, is refused: a run writes and deletes there."""
        self.work.check_usable()
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
            if self._discard:
                self.work.remove()

    def discard_work(self) -> None:
        """Remove the work directory when the lock is released: nothing in it can serve a
        rerun (a failure that needs other inputs)."""
        self._discard = True

    def start(
        self,
        *,
        tensors: int,
        total_bytes: int,
        done: int,
        done_bytes: int,
        changes: list[str],
        unit: str | None = None,
    ) -> None:
        """The ``start`` event: totals, what is already done (resumed) and why not more;
        ``unit``: what ``tensors`` counts when it is not tensors (infer: ``steps``)."""
        self.done = done
        info = {
            "tensors": tensors,
            "bytes": total_bytes,
            "done": done,
            "done_bytes": done_bytes,
            "changes": changes,
            "work_dir": self.work.path if self.work else None,
        }
        self.emit("start", {**info, "unit": unit} if unit else info)

    def start_tasks(self, tasks: Sequence, pending: Sequence, changes: list[str]) -> None:
        """The ``start`` event of a run of planned ``tasks`` (each reading ``read_bytes``) of
        which only ``pending`` are computed: the others are done (reused from a previous run)."""
        total_bytes = sum(task.read_bytes for task in tasks)
        self.start(
            tensors=len(tasks),
            total_bytes=total_bytes,
            done=len(tasks) - len(pending),
            done_bytes=total_bytes - sum(task.read_bytes for task in pending),
            changes=changes,
        )

    @property
    def in_process(self) -> bool:
        """Whether the tasks run in this process (Dask's threaded scheduler), not in worker
        processes (``--gpus``, ``--scheduler``)."""
        return not self.run.scheduler and not self.gpus

    def compute(self, calls: list[TaskCall], progress: bool = True) -> dict[str, object]:
        """Run ``calls`` where the options say (threads here, ``--gpus`` workers or a running
        cluster); return each call's result by its key. With ``progress``, a ``tensor`` event
        as each finishes, counted with those done before (``start``) for ``maybe_crash``."""
        results: dict[str, object] = {}
        by_key = {call.key: call for call in calls}

        def finished(key: str, result: object) -> None:
            results[key] = result
            if progress:
                call = by_key[key]
                self.emit("tensor", {"key": call.tensor, "bytes": call.read_bytes})
                maybe_crash("compute", self.done + len(results))

        run_tasks(
            calls,
            finished,
            workers=self.run.workers,
            device=self.device,
            scheduler=self.run.scheduler,
            gpus=self.gpus,
            on_cluster=lambda link: self.emit("cluster", {"dashboard": link}),
            on_warning=lambda message: self.emit("warning", {"message": message}),
            max_memory=self.budget,
        )
        return results

    def write_manifest(self, manifest: dict) -> None:
        """``run.json``: what the run depends on, plus its command and outputs (so ``clean``
        finds the temporary output a killed run left). Temporaries a previous run left for
        outputs this run does not write (another ``--rank`` list) are removed: no run of this
        work directory could finish them now."""
        outputs = [self.output, *self.outputs]
        stale = [
            file
            for file in leftover_temporaries(self.work.read_manifest())
            if file not in leftover_temporaries({"outputs": outputs})
        ]
        for file in stale:
            remove_quietly(file)
        if stale:
            self.emit("note", {"message": f"removed the previous run's {', '.join(stale)}"})
        self.work.write_manifest(
            {**manifest, "command": self.command, "output": self.output, "outputs": outputs}
        )

    def add_writer(self, writer):
        """An output of this run (``io.writer``'s or ``export.writer``'s): published with the
        report, or aborted (or kept to resume) when the run fails. Returns it."""
        self.writers.append(writer)
        return writer

    def publish(self, report: dict) -> dict:
        """Make the outputs and the report appear together: every output's temporaries are
        sealed, the report written under a temporary name, then all are renamed into place
        (output files first, report last). Before that nothing at the output changed."""
        for each in self.writers:
            each.seal()
        report["summary"]["files"] = [file for w in self.writers for file in w.final_files]
        report["summary"]["report"] = self.report_path
        pending = temporary_name(self.report_path)
        try:
            write_json_to(pending, strict_json(report))
            for each in self.writers:
                each.publish()
        except BaseException:
            remove_quietly(pending)
            raise
        os.replace(pending, self.report_path)
        return report

    def fail(self, failure: BaseException, output_resumes: bool) -> None:
        """After ``failure``: nothing at the outputs changes. Where the temporary output is what
        a rerun resumes from (``output_resumes``: merge writes in place), it is kept, unless the
        input was bad (a rerun needs other inputs): then it and the work directory go."""
        bad_input = isinstance(failure, LoraforgeError) and not isinstance(failure, ClusterError)
        if output_resumes and not bad_input:
            temporaries = [file for writer in self.writers for file in writer.temporaries]
            for writer in self.writers:
                writer.close()
            self.keep_for_resume(temporaries)
            return
        for writer in self.writers:
            writer.abort()
        if output_resumes:
            self.discard_work()

    def save_report(self, report: dict) -> None:
        """The report alone, for a run refused after its checks (``merge --strict``)."""
        report["summary"]["report"] = self.report_path
        write_json(self.report_path, strict_json(report))

    def keep_for_resume(self, temporaries: list[str]) -> None:
        """Say where a failed run left what a rerun resumes from, and how to remove it."""
        where = ", ".join([*temporaries, self.work.path])
        self.emit(
            "note",
            {
                "message": f"kept to resume: {where}; rerun the same command to finish, or "
                f"`loraforge clean {self.work.path}` to remove them"
            },
        )


@dataclass(frozen=True)
class Recompute:
    """Planned tasks run again where the run's tasks run (its workers or cluster, with their
    device), for results whose intermediates did not read back. Built by a command from its
    task calls (data) before the export, which runs them through this and never calls back
    into the command."""

    session: Session
    calls: Mapping[str, TaskCall]  # by the tensor key a call computes

    def __call__(self, key: str) -> dict:
        call = self.calls[key]
        return self.session.compute([call], progress=False)[call.key]
