"""``extract``: plan → compute missing tensors on Dask → write the output → report, filled into
the run layer's command skeleton (``run/command.py``)."""

from __future__ import annotations

import time

from ..export.compute import compute_and_export
from ..export.outputs import lowrank_entry, outputs_summary
from ..export.write import Exported
from ..export.writer import lora_location
from ..io.reader import CheckpointIndex, index_checkpoint
from ..run.cluster import TaskCall
from ..run.command import execute
from ..run.device import device_type
from ..run.options import RunOptions
from ..run.paths import check_two_models, checkpoint_paths
from ..run.report import blocked_note, build_report, memory_summary
from ..run.session import Progress, Session
from .blocked import block_rows_for, blocked_bytes, working_bytes
from .checks import check_changed, check_something_to_extract, surprises
from .options import ExtractOptions, KernelOptions
from .plan import ExtractionPlan, ExtractTask, plan_extraction
from .resume import Decision, input_changes, resume_decisions
from .task import run_extract_task, stage_bytes


def extract(
    *,
    source_model: str,
    target_model: str,
    output: str,
    options: ExtractOptions,
    run: RunOptions | None = None,
    source_type: str = "safetensors",
    target_type: str = "safetensors",
    progress: Progress | None = None,
) -> dict:
    """Extract a LoRA of ``target_model − source_model`` into ``output``; return the report
    (also saved as JSON)."""
    run, output = lora_location(run or RunOptions(), output, options.style)
    command = Extraction(source_model, source_type, target_model, target_type, options)
    return execute(command, run, output, progress)


class Extraction:
    """The extraction filled into the command skeleton."""

    name = "extract"
    output_option = "--output"
    work = "results"

    def __init__(self, source: str, source_type: str, target: str, target_type: str, options):
        self.source_model, self.source_type = source, source_type
        self.target_model, self.target_type = target, target_type
        self.options: ExtractOptions = options
        self.output_format = options.output_format

    def prepare(self, session: Session) -> None:
        check_two_models(self.source_model, self.target_model)
        self.source: CheckpointIndex = index_checkpoint(self.source_model, self.source_type)
        self.target: CheckpointIndex = index_checkpoint(self.target_model, self.target_type)
        self.plan: ExtractionPlan = plan_extraction(self.source, self.target, self.options)
        session.check_paths(
            checkpoint_paths("--source-model", self.source)
            + checkpoint_paths("--target-model", self.target),
            self.options.written_beside(session.output),
        )
        check_something_to_extract(self.plan, self.source, self.target)
        self.warnings = surprises(self.plan, self.source, self.target)
        for warning in self.warnings:
            session.emit("warning", {"message": warning})

    def begin(self, session: Session, previous: dict | None) -> dict:
        manifest = {
            "kernel": self.options.kernel.to_dict(),
            "device": device_type(session.device),
            "inputs": {"source": self.source.fingerprint(), "target": self.target.fingerprint()},
        }
        self.changes = input_changes(previous, manifest)
        return manifest

    def run(self, session: Session) -> dict:
        plan, started = self.plan, session.started
        phases = {"prepare": time.time() - started}
        fingerprints, decisions, markers = resume_decisions(plan, session.work, session.device)
        calls = {
            t.key: _call(session, t, plan.options.kernel, fingerprints[t.key]) for t in plan.tasks
        }
        pending = [t for t in plan.tasks if not decisions[t.key].reuse]
        phases["resume_check"] = time.time() - started - sum(phases.values())

        def computed(finished: dict[str, dict]) -> None:
            check_changed(finished, self.target)
            phases["compute"] = time.time() - started - sum(phases.values())

        exported = compute_and_export(
            plan, session, calls, pending, markers, self.changes, checked=True, computed=computed
        )
        phases["write"] = time.time() - started - sum(phases.values())
        tensors = {
            task.key: _tensor_entry(task, markers[task.key], decisions[task.key], exported)
            for task in plan.tasks
        }
        for skipped in plan.skipped:
            tensors[skipped.key] = {"kind": "skipped", "note": skipped.reason, "status": "planned"}
        extra = {
            "files": [file for output in exported.outputs for file in output.writer.final_files],
            "outputs": outputs_summary(exported.outputs),
            "output": session.output,
            "device": session.device,
            "computed": sum(1 for d in decisions.values() if not d.reuse),
            "reused": sum(1 for d in decisions.values() if d.reuse),
            "source_only": plan.source_only,
            "target_only": plan.target_only,
            "input_changes": self.changes,
            "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
            "memory": memory_summary(session.budget, tensors),
            "warnings": self.warnings,
            "clients": exported.report_clients(plan, tensors),
        }
        inputs = {"source": self.source.path, "target": self.target.path}
        return build_report("extract", plan.options.to_dict(), inputs, tensors, extra, started)


def _tensor_entry(task: ExtractTask, marker: dict, decision: Decision, exported: Exported) -> dict:
    """A tensor's line in the report: what it became, its rank and errors, how it was
    obtained (computed, reused, sliced from a larger stored rank, recomputed) and why."""
    note = exported.notes.get(task.key)
    entry = {
        "kind": "skipped" if marker["kind"] == "unchanged" else marker["kind"],
        "shape": list(task.shape),
        **_ranked(task.key, marker["kind"], exported.outputs),
        "seconds": marker.get("seconds"),
        "status": _status(decision, note),
    }
    if marker.get("iterations") is not None:  # power iterations the kernel used
        entry["iterations"] = marker["iterations"]
    notes = [n for n in (task.note, note) if n]
    if marker["kind"] == "unchanged":
        notes.append("unchanged (max |diff| <= 1e-8)")
    if decision.sliced_from:
        notes.append(f"sliced from stored rank {decision.sliced_from}")
    if marker.get("blocked"):
        notes.append(blocked_note(marker["blocked"]))
    if decision.note:
        notes.append(decision.note)
    if decision.reason:
        notes.append(f"recomputed: {decision.reason}")
    if notes:
        entry["note"] = "; ".join(notes)
    return entry


def _ranked(key: str, kind: str, outputs: list) -> dict:
    """A tensor's rank and errors in the report: those of the largest cap's output, plus, for a
    low-rank tensor, its kept energy and (with several caps) every output's under ``ranks``."""
    if kind == "unchanged":
        return {"rank": None, "rel_error": None, "kernel_rel_error": None}
    if kind != "lowrank":
        error, kernel_error = outputs[-1].errors[key]
        return {"rank": None, "rel_error": error, "kernel_rel_error": kernel_error}
    return lowrank_entry(key, outputs)


def _status(decision: Decision, note: str | None) -> str:
    if note:
        return "recomputed"
    if decision.reuse:
        return "sliced" if decision.sliced_from else "reused"
    return "computed"


def _call(
    session: Session, task: ExtractTask, kernel: KernelOptions, fingerprint: dict
) -> TaskCall:
    """The task of ``task``: whole when its working set fits the session's memory budget,
    else in row blocks (blocked.py), declaring the bytes it will hold either way."""
    dev = session.device
    block_rows = block_rows_for(task, kernel, session.budget, dev)
    if block_rows is None:
        memory, staging = working_bytes(task, kernel, dev), stage_bytes(task)
    else:  # rows go to the device block by block: no whole-tensor staging
        memory, staging = blocked_bytes(task, kernel, block_rows), 0
    return TaskCall(
        task.name,
        run_extract_task,
        (task, session.work.path, dev, kernel, fingerprint, block_rows),
        uses_gpu=dev.startswith("cuda"),  # every task uses the device
        stage_bytes=staging,
        memory_bytes=memory,
        tensor=task.key,
        read_bytes=task.read_bytes,
        reads=(task.source, task.target),
    )
