"""The skeleton every writing command runs, written once: open the session (output, device,
budget) → the command reads its inputs' headers, plans and checks every path → lock the work
directory → the command says what it depends on (the manifest) → compute and write the outputs'
temporaries → publish outputs and report together, or abort → clean up.

A command fills it in with a ``Command``: what it reads and plans (``prepare``), what its work
directory must match to be reused (``begin``) and the run itself (``run``: tasks on
``session.compute``, writers opened through ``session.add_writer``, the report returned). The
skeleton decides what happens to the outputs and the work directory on failure and success,
from what the work directory holds (``Command.work``)."""

from __future__ import annotations

from typing import Literal, Protocol

from .options import RunOptions
from .session import Progress, Session

# What a command's work directory holds: "results" (extract, resize: finished tensors, kept
# per --keep-work, what a rerun resumes from), "markers" (merge: markers vouching for the bytes
# of the temporary output, which is what a rerun resumes from; removed after success), None
# (convert: no work directory).
WorkKind = Literal["results", "markers"] | None


class Command(Protocol):
    name: str
    output_format: str
    output_option: str  # what messages call the output: "--output", or convert's OUT
    work: WorkKind

    def prepare(self, session: Session) -> None:
        """Read the inputs' headers, plan, check every path (``session.check_paths``) and say
        what is surprising (``session.emit``): all before any work."""

    def begin(self, session: Session, previous: dict | None) -> dict:
        """Under the work directory's lock (``previous``: the manifest of the run that used
        it last): clear what cannot serve this run; return this run's manifest."""

    def run(self, session: Session) -> dict:
        """Compute, write the outputs' temporaries (writers added to the session); return the
        report."""


def execute(
    command: Command, run: RunOptions, output: str, progress: Progress | None = None
) -> dict:
    """Run ``command`` writing ``output``; return its report (also saved as JSON)."""
    session = Session.open(
        command.name, run, output, command.output_format, progress, command.output_option
    )
    command.prepare(session)
    if command.work is None:
        return _run_and_publish(command, session)
    work = session.work
    with session.locked() as previous:
        try:
            if not run.resume:
                work.clear()
            manifest = command.begin(session, previous)
            work.create()
            session.write_manifest(manifest)
            report = _run_and_publish(command, session)
        finally:
            work.close_logs()  # this process's marker log: a long-lived process keeps no fd
    if command.work == "markers" or not run.keep_work:
        work.remove()
    return report


def _run_and_publish(command: Command, session: Session) -> dict:
    try:
        report = command.run(session)
        keeps = command.work == "results" and session.run.keep_work
        report["summary"]["work_dir"] = session.work.path if keeps else None
        return session.publish(report)
    except BaseException as failure:
        session.fail(failure, output_resumes=command.work == "markers")
        raise
