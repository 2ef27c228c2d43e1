"""``merge``: open the LoRAs → plan from headers → lay out the output → one Dask task per base
tensor writes its bytes in place → commit (fsync, rename) → report.

Resume (``resume.py``): the work directory holds the plan's fingerprint (``run.json``) and one
marker per tensor written; a rerun of the same merge computes only the tensors without one."""

from __future__ import annotations

from ..errors import ClusterError, LoraforgeError, LoraMismatch
from ..io.reader import index_checkpoint
from ..io.writer import open_output
from ..lora.config import MergeConfig
from ..lora.inputs import LoraInput, open_lora
from ..lora.patches import refusal
from ..lora.paths import lora_paths
from ..lora.summary import lora_summaries
from ..run.cluster import TaskCall
from ..run.faults import maybe_crash
from ..run.options import RunOptions
from ..run.paths import checkpoint_paths
from ..run.report import blocked_note, build_report, memory_summary
from ..run.session import Progress, Session
from .blocked import block_rows_for, blocked_bytes, can_block, working_bytes
from .fp8 import is_fp8_task
from .options import MergeOptions
from .plan import MergePlan, MergeTask, plan_merge
from .resume import changes_since, components_digest, marker_valid, merge_components
from .task import run_merge_task, stage_bytes

METADATA = {"format": "pt", "producer": "loraforge"}


# Tasks writing fp8 or a scale never run blocked (blocked.py can_block): said in the report.
WHOLE_FP8 = "ran whole over the memory budget (fp8 output needs the whole tensor for its scale)"


def merge(
    *,
    source_model: str,
    loras: MergeConfig,
    output: str,
    options: MergeOptions,
    run: RunOptions | None = None,
    source_type: str = "safetensors",
    lora_type: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """Merge ``loras`` into ``source_model``; return the report (also saved as JSON). A merge's
    work directory holds only markers, so it is removed after success whatever
    ``run.keep_work`` says."""
    run = run or RunOptions()
    session = Session.open("merge", run, output, options.output_format, progress)
    base = index_checkpoint(source_model, source_type)
    shapes = {key: info.shape for key, info in base.tensors.items()}
    opened = [open_lora(s, shapes, lora_type, options.allow_nonfinite) for s in loras.loras]
    session.check_paths(checkpoint_paths("--source-model", base) + lora_paths(opened, loras.path))
    if loras.unused:
        session.emit("note", {"message": _unused_note(loras)})
    plan = plan_merge(base, opened, options)
    if options.strict:
        _refuse_unmatched(base, opened, plan, session)
    for lora in opened:
        for warning in lora.warnings:
            session.emit("warning", {"message": f"{lora.label}: {warning}"})
    session.emit("loras", {"loras": lora_summaries(opened, plan.unmatched)})

    work = session.work
    with session.locked() as previous:
        components = merge_components(plan, base, opened, session.device)
        fingerprint = components_digest(components)
        same = run.resume and previous is not None and previous.get("fingerprint") == fingerprint
        changes = [] if same or not run.resume else changes_since(previous, components, work.path)
        if not same:
            work.clear()
        work.create()
        writer = open_output(
            session.output,
            options.output_format,
            plan.entries,
            options.max_shard_size,
            metadata={**METADATA, **plan.metadata},
            reuse=same,
        )
        session.write_manifest({"fingerprint": fingerprint, "components": components})
        try:
            markers = _run(plan, writer, session, fingerprint, changes)
            session.emit("write", {"tensors": len(plan.tasks)})
            report = _report(plan, base, opened, markers, writer.final_files, session, changes)
            report["summary"]["config"] = _config_summary(loras)
            session.publish(writer, report)
        except BaseException as failure:
            if isinstance(failure, LoraforgeError) and not isinstance(failure, ClusterError):
                writer.abort()  # bad input: a rerun needs other inputs, so nothing to resume
                session.discard_work()
            else:  # interrupted, out of space, workers lost: a rerun resumes
                temporaries = writer.temporaries
                writer.close()
                session.keep_for_resume(temporaries)
            raise
    work.remove()
    return report


def _call(task: MergeTask, writer, session: Session, fingerprint: dict, options) -> TaskCall:
    """The task of ``task``: whole when it fits the session's memory budget, else in row
    blocks (blocked.py), declaring the bytes it will hold either way."""
    dev = session.device
    block_rows = block_rows_for(task, session.budget)
    if block_rows is None:
        memory, staging = working_bytes(task), stage_bytes(task)
    else:  # rows go to the device block by block: no whole-tensor staging
        memory, staging = blocked_bytes(task, block_rows), 0
    return TaskCall(
        task.name,
        run_merge_task,
        (
            task,
            writer.slot(task.key),
            session.work.path,
            dev,
            {"fingerprint": fingerprint},
            options.allow_nonfinite,
            block_rows,
        ),
        uses_gpu=dev.startswith("cuda") and task.kind == "merged",
        stage_bytes=staging,
        memory_bytes=memory,
    )


def _unused_note(loras: MergeConfig) -> str:
    fields = ", ".join(loras.unused)
    return f"{loras.path}: fields not used by loraforge merge (it reads the LoRA fields): {fields}"


def _config_summary(loras: MergeConfig) -> dict | None:
    """The ``--config`` file read, the entries' ``name`` chosen, its fields not used."""
    if loras.path is None:
        return None
    return {"path": loras.path, "name": loras.name, "not_used": list(loras.unused)}


def _refuse_unmatched(base, opened: list[LoraInput], plan: MergePlan, session: Session) -> None:
    """``--strict``: an assumption about a LoRA or any key that would not be merged stops the
    run before any work; the line counts the keys per cause, a shape mismatch first (the
    likeliest sign of a LoRA made for another model), and the report lists every key."""
    for lora, unmatched in zip(opened, plan.unmatched, strict=True):
        if lora.warnings:
            error = LoraMismatch(lora.warnings[0], path=lora.label, hint="--strict refuses it")
        elif unmatched:
            error = refusal(lora, unmatched)
        else:
            continue
        _save_refusal_report(base, opened, plan, session, str(error))
        raise error


def _save_refusal_report(base, opened, plan, session: Session, message: str) -> None:
    extra = {
        "files": [],
        "output": None,
        "device": session.device,
        "refused": message,
        "loras": lora_summaries(opened, plan.unmatched),
        "work_dir": None,
    }
    inputs = {"source": base.path, "loras": [lora.label for lora in opened]}
    report = build_report("merge", plan.options.to_dict(), inputs, {}, extra, session.started)
    session.save_report(report)


def _run(plan: MergePlan, writer, session: Session, fingerprint: str, changes: list[str]) -> dict:
    """Reuse every tensor whose marker still vouches for its bytes, compute the rest."""
    markers: dict[str, dict] = {}
    for task in plan.tasks:
        marker = session.work.read_marker(task.key)
        if writer.final_file(task.key) in writer.reused and marker_valid(
            marker, fingerprint, writer.slot(task.key)
        ):
            markers[task.key] = {**marker, "status": "reused"}
            writer.mark_written(task.key, marker.get("crc", 0))
    pending = [t for t in plan.tasks if t.key not in markers]
    session.start(
        tensors=len(plan.tasks),
        total_bytes=plan.total_bytes,
        done=len(markers),
        done_bytes=plan.total_bytes - sum(t.read_bytes for t in pending),
        changes=changes,
    )
    _compute(pending, plan.options, writer, session, fingerprint, markers)
    return markers


def _compute(
    pending: list[MergeTask], options: MergeOptions, writer, session: Session, fingerprint, markers
) -> None:
    calls = [_call(task, writer, session, fingerprint, options) for task in pending]
    by_key = {task.name: task for task in pending}

    def finished(key: str, result: dict) -> None:
        task = by_key[key]
        marker = markers[task.key] = {**result, "status": "computed"}
        writer.mark_written(task.key, marker["crc"])
        session.emit("tensor", {"key": task.key, "bytes": task.read_bytes})
        maybe_crash("compute", len(markers))

    session.compute(calls, finished)


def _report(plan, base, opened, markers, files, session: Session, changes) -> dict:
    tensors = {}
    for task in plan.tasks:
        marker = markers[task.key]
        tensors[task.key] = {
            "kind": task.kind,
            "shape": list(task.entry.shape),
            "dtype": task.out_dtype,
            "loras": [opened[p.lora].label for p in task.patches],
            "seconds": marker.get("seconds"),
            "status": marker["status"],
        }
        if marker.get("blocked"):
            tensors[task.key]["note"] = blocked_note(marker["blocked"])
        elif not can_block(task) and is_fp8_task(task) and working_bytes(task) > session.budget:
            tensors[task.key]["note"] = WHOLE_FP8
    extra = {
        "files": files,
        "output": session.output,
        "device": session.device,
        "computed": sum(1 for m in markers.values() if m["status"] == "computed"),
        "reused": sum(1 for m in markers.values() if m["status"] == "reused"),
        "loras": lora_summaries(opened, plan.unmatched),
        "input_changes": changes,
        "dropped": plan.dropped,
        "warnings": [f"{lora.label}: {w}" for lora in opened for w in lora.warnings],
        "work_dir": None,
        "memory": memory_summary(session.budget, tensors),
    }
    inputs = {"source": base.path, "loras": [lora.label for lora in opened]}
    return build_report("merge", plan.options.to_dict(), inputs, tensors, extra, session.started)
