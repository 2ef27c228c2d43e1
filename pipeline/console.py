"""What a person or a batch job sees: progress bars, the summary table, ``--json`` event lines,
and the one-line rendering of errors. Commands report through ``Progress`` callbacks; this
module turns those events into output, for every command alike."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .errors import Interrupted, LoraforgeError
from .io.atomic import strict_json
from .run.options import RunOptions

err = Console(stderr=True, highlight=False, emoji=False)  # ":x:" in a path stays text

KEPT = "finished tensors are kept in the work directory"

# The machine's state, not a bug: a full disk or quota, a read-only or forbidden location.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class Failed(Exception):
    """An error already printed as its one line; leave with ``exit_code``."""

    def __init__(self, exit_code: int):
        super().__init__(exit_code)
        self.exit_code = exit_code


# Per command: what names the places it writes, and whether a rerun resumes; for the line a
# full disk, an unwritable location or an interrupt gets.
WRITES = {
    "extract": ("--output / --work-dir", True),
    "merge": ("--output / --work-dir", True),
    "resize": ("--output / --work-dir", True),
    "convert": ("OUT / --report", False),
    "verify": ("--report", False),
    "infer": ("--save_result_path / --report", False),
    "serve": ("--save_result_path", False),
    "inspect": ("", False),
    "clean": ("", False),
}
NOTHING_KEPT = ("", False)  # no command named
FULL = {errno.ENOSPC, errno.EDQUOT}


def environment_line(e: OSError, command: str | None) -> str:
    """The one line for an ``OSError`` of the machine's state (``ENVIRONMENT_ERRNOS``): free
    space, or a writable place, named as ``command`` names it; "rerun to resume" only for
    commands that keep finished work."""
    where = f"{e.filename}: " if e.filename else ""
    places, resumes = WRITES.get(command or "", NOTHING_KEPT)
    if command == "clean":
        fix = "loraforge removes nothing it cannot; fix the permissions and run clean again"
    elif e.errno in FULL:
        fix = f"free space or pick another {places}" if places else "free space"
    else:
        fix = f"pick a writable {places}" if places else "fix the permissions"
    if resumes:
        fix += "; finished tensors are kept, rerun to resume"
    return f"{where}{e.strerror} ({fix})"


def interrupted(command: str | None) -> Interrupted:
    """The error for Ctrl-C (or SIGTERM) during ``command``: what is kept, and what to rerun."""
    if command == "clean":
        return Interrupted("interrupted before clean finished", hint="run clean again")
    if WRITES.get(command or "", NOTHING_KEPT)[1]:
        return Interrupted(f"interrupted; {KEPT}", hint="rerun the same command to resume")
    return Interrupted("interrupted; nothing was written")


@contextmanager
def user_errors(log: JsonLog | None = None, command: str | None = None) -> Iterator[None]:
    """One line and an exit code (``Failed``) for user errors, a full disk or an unwritable
    place (named as ``command`` names it) and interrupts (SIGTERM counts as Ctrl-C); a
    traceback only with LORAFORGE_TRACEBACK=1. With ``--json`` the line is also an ``error``
    event on stdout."""

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except LoraforgeError as e:
        _fail(str(e), e.exit_code, log)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        _fail(environment_line(e, command), 1, log)
    except KeyboardInterrupt:
        e = interrupted(command)
        _fail(str(e), e.exit_code, log)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, exit_code: int, log: JsonLog | None) -> None:
    if os.environ.get("LORAFORGE_TRACEBACK"):
        traceback.print_exc()
    print_error(message, exit_code, log)
    raise Failed(exit_code) from None


def print_error(message: str, exit_code: int, log: JsonLog | None = None) -> None:
    """The one ``error:`` line on stderr (and, with ``--json``, the ``error`` event)."""
    err.print(f"error: {message}", markup=False, soft_wrap=True)
    if log is not None:
        log.emit("error", {"message": message, "exit_code": exit_code})


class JsonLog:
    """``--json``: progress events as JSON lines on stdout, one object per line, for batch
    jobs. Every line has ``event``, ``command`` and ``time`` (Unix seconds); per event:

    - ``start``: ``tensors``, ``bytes`` (to read), ``done`` and ``done_bytes`` (already
      finished, resumed), ``changes`` (why entries are recomputed), ``work_dir``; ``unit``
      (infer: ``steps``, then ``tensors`` counts denoising steps)
    - ``loras`` (merge, infer): ``loras``, one object per LoRA (``path``, ``strength``,
      ``patches``, ``unmatched``: LoRA key → why it is not merged; infer: ``model``, the
      transformer it patches)
    - ``cluster``: ``dashboard`` (the Dask dashboard URL; null for the embedded cluster)
    - ``tensor``: one tensor finished: ``key``, ``bytes`` (read), ``done``, ``tensors``
    - ``step`` (infer): one denoising step finished: ``step``, ``timestep``, ``seconds``
    - ``write``: every tensor is computed; (extract) the output is being written
    - ``summary``: the report's summary (``kinds``, ``status``, ``seconds``, ``files``,
      ``output``, ``computed``, ``reused``, ``report`` (the JSON report's path), ...)
    - ``error``: ``message`` (the one line also printed on stderr), ``exit_code``

    - ``warning``: ``message``: something surprising that did not stop the run
    - ``note``: ``message``: e.g. where a failed run left what a rerun resumes from

    Events other than these may be added; readers should skip unknown ones. Warnings and notes
    also go to stderr, through a quiet ``Bar``."""

    def __init__(self, command: str):
        self.command = command
        self.warnings = Bar(quiet=True)
        self.done = self.total = 0

    def __call__(self, event: str, info: dict) -> None:
        self.warnings(event, info)
        if event == "start":
            self.done, self.total = info["done"], info["tensors"]
        elif event == "tensor":
            self.done += 1
            info = {**info, "done": self.done, "tensors": self.total}
        self.emit(event, info)

    def emit(self, event: str, info: dict) -> None:
        line = {"event": event, "command": self.command, "time": round(time.time(), 3), **info}
        sys.stdout.write(json_line(line) + "\n")
        sys.stdout.flush()

    def finish(self, report: dict) -> None:
        self.emit("summary", report["summary"])

    def close(self) -> None:
        pass


class Bar:
    """Progress callback → a rich bar of tensors and bytes, plus one line per LoRA of a merge.
    Warnings, notes and lines about LoRA keys left out are printed even when quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress: Progress | None = None

    def __call__(self, event: str, info: dict) -> None:
        if event == "loras":
            self._loras(info["loras"])
        elif event in ("warning", "note"):  # shown even when quiet: never dropped silently
            # through the bar's console while it runs: printed above it, the bar goes on
            console = self.progress.console if self.progress else err
            console.print(f"{event}: {info['message']}", markup=False, soft_wrap=True)
        if self.quiet:
            return
        if event == "start":
            self._start(info)
        elif event == "cluster" and info.get("dashboard"):
            err.print(f"Dask dashboard: {info['dashboard']}", markup=False)
        elif event in ("tensor", "step") and self.progress:
            self.bytes_done += info.get("bytes", 0)
            self.progress.update(self.task, advance=1, gb=self._gb())
        elif event == "write" and self.progress:
            self.progress.update(self.task, completed=info["tensors"])
            self.progress.stop()
            self.progress = None

    def _start(self, info: dict) -> None:
        for change in info.get("changes", []):
            err.print(f"note: {change}; affected tensors are recomputed", markup=False)
        if info["done"]:
            err.print(
                f"resuming: {info['done']} of {info['tensors']} tensors already done "
                f"in {info['work_dir']}",
                markup=False,
            )
        self.progress = Progress(
            TextColumn(info.get("unit", "tensors")),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[gb]}"),
            TimeRemainingColumn(),
            console=err,
            transient=False,
        )
        self.progress.start()
        self.bytes_done, self.bytes_total = info["done_bytes"], info["bytes"]
        self.task = self.progress.add_task(
            "tensors", total=info["tensors"], completed=info["done"], gb=self._gb()
        )

    def _loras(self, loras: list[dict]) -> None:
        for lora in loras:
            unmatched = lora["unmatched"]
            n = lora["patches"]
            model = f" ({lora['model']})" if lora.get("model") else ""
            line = (
                f"{lora['path']}{model}: {n} tensor{'s' if n != 1 else ''} patched at strength "
                f"{lora['strength']:g}"
            )
            if unmatched:
                key, reason = next(iter(unmatched.items()))
                line = (
                    f"warning: {line}; {len(unmatched)} of {lora['keys']} keys not merged "
                    f"(listed in the report), e.g. '{key}': {reason}"
                )
            if unmatched or not self.quiet:
                err.print(line, markup=False, soft_wrap=True)

    def _gb(self) -> str:
        if not self.bytes_total:  # steps, not bytes
            return ""
        return f"{self.bytes_done / 1e9:.2f}/{self.bytes_total / 1e9:.2f} GB read"

    def finish(self, report: dict) -> None:
        self.close()
        if not self.quiet:
            print_summary(report)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None


def print_summary(report: dict) -> None:
    """The summary table (tensors per kind; error columns when the command measures errors),
    the status counts and time, keys in one model only, and the files written."""
    summary, tensors = report["summary"], report["tensors"].values()
    if "phases" in summary:  # a run without tensors (infer): where the time went
        phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in summary["phases"].items())
        err.print(f"{phases}; peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB", markup=False)
        for file in summary["files"]:
            err.print(f"wrote {file}", markup=False)
        return
    with_errors = any(t.get("rel_error") is not None for t in tensors)
    table = Table(title="loraforge " + report["command"], show_header=True)
    table.add_column("kind")
    table.add_column("tensors", justify="right")
    if with_errors:
        table.add_column("mean rel. error", justify="right")
        table.add_column("max rel. error", justify="right")
    for kind in sorted(summary["kinds"]):
        row = [kind, str(summary["kinds"][kind])]
        if with_errors:
            errors = [
                t["rel_error"]
                for t in tensors
                if t["kind"] == kind and t.get("rel_error") is not None
            ]
            mean = f"{sum(errors) / len(errors):.4g}" if errors else ""
            row += [mean, f"{max(errors):.4g}" if errors else ""]
        table.add_row(*row)
    err.print(table)
    status = ", ".join(f"{n} {s}" for s, n in summary["status"].items())
    err.print(f"{status}; {summary['seconds']:.1f} s", markup=False)
    for side in ("source_only", "target_only"):
        if summary.get(side):
            err.print(
                f"{len(summary[side])} keys only in the {side.split('_')[0]} model "
                f"(listed in the report), e.g. {summary[side][0]}",
                markup=False,
            )
    if summary.get("worst") is not None:  # verify: the total and the worst tensors
        undefined = "undefined (F equals B, B + LoRA does not)"
        total = summary["rel_error"]
        err.print(
            f"total relative error {undefined if total is None else f'{total:.4g}'}",
            markup=False,
        )
        for worst in summary["worst"][:5]:
            value = worst["rel_error"]
            err.print(
                f"  {worst['key']}: {undefined if value is None else f'{value:.4g}'}",
                markup=False,
            )
    for file in summary["files"]:
        err.print(f"wrote {file}", markup=False)


def print_cleaned(cleaned) -> None:
    """What ``loraforge clean`` removed (``workdir.clean.Cleaned``), and what it kept."""
    for file in cleaned.temporaries:
        err.print(f"removed the temporary output {file} left to resume", markup=False)
    freed = f"{cleaned.size / 1e9:.2f} GB"
    if not os.path.exists(cleaned.path):
        err.print(f"removed {cleaned.path} ({freed})", markup=False)
        return
    others = cleaned.kept or sorted(os.listdir(cleaned.path))
    more = f" and {len(others) - 1} more" if len(others) > 1 else ""
    err.print(
        f"removed loraforge's files from {cleaned.path} ({freed}); the directory is kept: it "
        f"holds {others[0] if others else 'files of yours'}{more}, not loraforge's",
        markup=False,
    )


@contextmanager
def command_output(command: str, run: RunOptions) -> Iterator[Bar | JsonLog]:
    """What a command's run shows: a bar (or ``--json`` events), fed by the progress callback
    this yields, and one-line errors (``Failed``). The caller hands the report to its
    ``finish`` for the summary."""
    log = JsonLog(command) if run.json else None
    with user_errors(log, command):
        display = log or Bar(run.quiet)
        try:
            yield display
        finally:
            display.close()


def json_line(data: object) -> str:
    """``data`` as one line of strict JSON: a NaN or infinite number (an alpha holding NaN,
    say) becomes null (``io.atomic.strict_json``), as in the reports."""
    return json.dumps(strict_json(data), default=str, allow_nan=False)
