"""``extract``: plan → compute missing tensors on Dask → write the output → report."""

from __future__ import annotations

import time

from ..io.reader import index_checkpoint
from ..lora.export import abort, export, lowrank_entry, outputs_summary, singular_values
from ..lora.writer import beside_directory, weights_file
from ..run.cluster import TaskCall
from ..run.device import device_type
from ..run.faults import maybe_crash
from ..run.options import RunOptions
from ..run.paths import checkpoint_paths
from ..run.report import blocked_note, build_report, memory_summary
from ..run.session import Progress, Session
from .blocked import block_rows_for, blocked_bytes, working_bytes
from .checks import check_something_to_extract, surprises
from .export import open_outputs, written_files
from .options import ExtractOptions
from .plan import ExtractionPlan, plan_extraction
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
    run = beside_directory(run or RunOptions(), output, options.style)
    output = weights_file(output, options.style)
    session = Session.open("extract", run, output, options.output_format, progress)
    source = index_checkpoint(source_model, source_type)
    target = index_checkpoint(target_model, target_type)
    plan = plan_extraction(source, target, options)
    session.check_paths(
        checkpoint_paths("--source-model", source) + checkpoint_paths("--target-model", target),
        written_files(plan, session.output),
    )
    check_something_to_extract(plan, source, target)
    warnings = surprises(plan, source, target)
    for warning in warnings:
        session.emit("warning", {"message": warning})
    work = session.work
    with session.locked() as previous:
        if not run.resume:
            work.clear()
        work.create()
        manifest = {
            "kernel": options.kernel.to_dict(),
            "device": device_type(session.device),
            "inputs": {"source": source.fingerprint(), "target": target.fingerprint()},
        }
        changes = input_changes(previous, manifest)
        session.write_manifest(manifest)
        report, outputs = _run(plan, source, target, session, changes)
        report["summary"]["work_dir"] = work.path if run.keep_work else None
        report["summary"]["warnings"] = warnings
        try:
            session.publish([output.writer for output in outputs], report)
        except BaseException:
            abort(outputs)  # nothing at the output changed; the work directory has it all
            raise
    if not run.keep_work:
        work.remove()
    return report


def _run(
    plan: ExtractionPlan, source, target, session: Session, changes: list[str]
) -> tuple[dict, object]:
    """Resume decisions, compute, write the output's temporaries; return the report and the
    filled writer, for the caller to publish."""
    work, dev, started = session.work, session.device, session.started
    kernel = plan.options.kernel
    phases = {"prepare": time.time() - started}
    fingerprints, decisions, markers = resume_decisions(plan, work, dev)
    pending = [t for t in plan.tasks if not decisions[t.key].reuse]
    session.start(
        tensors=len(plan.tasks),
        total_bytes=plan.total_bytes,
        done=len(plan.tasks) - len(pending),
        done_bytes=plan.total_bytes - sum(t.read_bytes for t in pending),
        changes=changes,
    )

    def recompute(task) -> dict:
        # Where the tasks run (a --gpus worker, the cluster), not in this process: the client
        # may be a head node without the workers' device.
        return _compute_one(session, task, kernel, fingerprints[task.key])

    phases["resume_check"] = time.time() - started - sum(phases.values())
    _compute(session, pending, kernel, fingerprints, markers)
    phases["compute"] = time.time() - started - sum(phases.values())
    session.emit("write", {"tensors": len(plan.tasks)})
    values, recomputed = singular_values(plan.tasks, markers, work, recompute)
    outputs = open_outputs(plan, markers, values, session.output)
    try:
        dtype = plan.options.torch_dtype
        recomputed.update(export(plan.tasks, markers, work, outputs, values, dtype, recompute))
    except BaseException:
        abort(outputs)
        raise
    phases["write"] = time.time() - started - sum(phases.values())
    tensors = {}
    for task in plan.tasks:
        marker, decision = markers[task.key], decisions[task.key]
        note = recomputed.get(task.key)
        entry = {
            "kind": "skipped" if marker["kind"] == "unchanged" else marker["kind"],
            "shape": list(task.shape),
            **_ranked(task.key, marker["kind"], outputs),
            "seconds": marker.get("seconds"),
            "status": _status(decision, note),
        }
        if marker.get("iterations") is not None:  # power iterations the kernel used
            entry["iterations"] = marker["iterations"]
        notes = [
            n
            for n in (
                task.note,
                note,
                "unchanged (max |diff| <= 1e-8)" if marker["kind"] == "unchanged" else None,
            )
            if n
        ]
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
        tensors[task.key] = entry
    for skipped in plan.skipped:
        tensors[skipped.key] = {"kind": "skipped", "note": skipped.reason, "status": "planned"}
    extra = {
        "files": [file for output in outputs for file in output.writer.final_files],
        "outputs": outputs_summary(outputs),
        "output": session.output,
        "device": dev,
        "computed": sum(1 for d in decisions.values() if not d.reuse),
        "reused": sum(1 for d in decisions.values() if d.reuse),
        "source_only": plan.source_only,
        "target_only": plan.target_only,
        "input_changes": changes,
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
        "memory": memory_summary(session.budget, tensors),
    }
    report = build_report(
        "extract",
        plan.options.to_dict(),
        {"source": source.path, "target": target.path},
        tensors,
        extra,
        started,
    )
    return report, outputs


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


def _call(session: Session, task, kernel, fingerprint: dict) -> TaskCall:
    """The task of ``task``: whole when its working set fits the session's memory budget,
    else in row blocks (blocked.py), declaring the bytes it will hold either way."""
    dev = session.device
    block_rows = block_rows_for(task, kernel, session.budget)
    if block_rows is None:
        memory, staging = working_bytes(task, kernel), stage_bytes(task)
    else:  # rows go to the device block by block: no whole-tensor staging
        memory, staging = blocked_bytes(task, kernel, block_rows), 0
    return TaskCall(
        task.name,
        run_extract_task,
        (task, session.work.path, dev, kernel, fingerprint, block_rows),
        uses_gpu=dev.startswith("cuda"),  # every task uses the device
        stage_bytes=staging,
        memory_bytes=memory,
    )


def _compute_one(session: Session, task, kernel, fingerprint: dict) -> dict:
    """One task run through the session (as ``_compute`` runs them); its marker."""
    results = {}
    session.compute([_call(session, task, kernel, fingerprint)], results.__setitem__)
    return results[task.name]


def _compute(session: Session, pending: list, kernel, fingerprints: dict, markers: dict) -> None:
    calls = [_call(session, task, kernel, fingerprints[task.key]) for task in pending]
    by_key = {task.name: task for task in pending}

    def finished(key: str, marker: dict) -> None:
        task = by_key[key]
        markers[task.key] = marker
        maybe_crash("compute", len(markers))
        session.emit("tensor", {"key": task.key, "bytes": task.read_bytes})

    session.compute(calls, finished)
