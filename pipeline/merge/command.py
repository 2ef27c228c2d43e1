"""``merge``: open the LoRAs → plan from headers → lay out the output → one Dask task per base
tensor writes its bytes in place → commit (fsync, rename) → report.

Resume (``resume.py``): the work directory holds the plan's fingerprint (``run.json``) and one
marker per tensor written; a rerun of the same merge computes only the tensors without one."""

from __future__ import annotations

import functools

from ..errors import LoraMismatch
from ..io.reader import index_checkpoint
from ..io.stream import finish_writes
from ..io.writer import PRODUCER, open_output
from ..lora.config import MergeConfig
from ..lora.inputs import LoraInput, open_lora
from ..lora.patches import refusal
from ..lora.paths import lora_paths
from ..lora.summary import lora_summaries
from ..run.clock import task_seconds
from ..run.cluster import TaskCall
from ..run.command import execute
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
    command = Merge(source_model, source_type, loras, lora_type, options)
    return execute(command, run or RunOptions(), output, progress)


class Merge:
    """The merge filled into the command skeleton: the temporary output, written in place, is
    what a rerun resumes, vouched for by one marker per tensor in the work directory."""

    name = "merge"
    output_option = "--output"
    work = "markers"

    def __init__(self, source: str, source_type: str, loras: MergeConfig, lora_type, options):
        self.source, self.source_type = source, source_type
        self.loras, self.lora_type, self.options = loras, lora_type, options
        self.output_format = options.output_format

    def prepare(self, session: Session) -> None:
        loras, options = self.loras, self.options
        self.base = base = index_checkpoint(self.source, self.source_type)
        shapes = {key: info.shape for key, info in base.tensors.items()}
        self.opened = opened = [
            open_lora(s, shapes, self.lora_type, options.allow_nonfinite) for s in loras.loras
        ]
        session.check_paths(
            checkpoint_paths("--source-model", base) + lora_paths(opened, loras.path)
        )
        if loras.unused:
            session.emit("note", {"message": _unused_note(loras)})
        self.plan = plan_merge(base, opened, options)
        if options.strict:
            _refuse_unmatched(base, opened, self.plan, session)
        for lora in opened:
            for warning in lora.warnings:
                session.emit("warning", {"message": f"{lora.label}: {warning}"})
        session.emit("loras", {"loras": lora_summaries(opened, self.plan.unmatched)})

    def begin(self, session: Session, previous: dict | None) -> dict:
        components = merge_components(self.plan, self.base, self.opened, session.device)
        self.fingerprint = components_digest(components)
        resume = session.run.resume
        self.same = (
            resume and previous is not None and previous.get("fingerprint") == self.fingerprint
        )
        if self.same or not resume:
            self.changes = []
        else:
            self.changes = changes_since(previous, components, session.work.path)
            session.work.clear()
        return {"fingerprint": self.fingerprint, "components": components}

    def run(self, session: Session) -> dict:
        plan, options = self.plan, self.options
        writer = session.add_writer(
            open_output(
                session.output,
                options.output_format,
                plan.entries,
                options.max_shard_size,
                metadata={**PRODUCER, **plan.metadata},
                reuse=self.same,
            )
        )
        markers = _reused_markers(plan, writer, session, self.fingerprint)
        pending = [t for t in plan.tasks if t.key not in markers]
        session.start_tasks(plan.tasks, pending, self.changes)
        calls = [_call(task, writer, session, self.fingerprint, options) for task in pending]
        try:
            results = session.compute(calls)
        except BaseException:
            finish_writes(writer.temporaries, raise_errors=False)  # nothing lands after the end
            raise
        finish_writes(writer.temporaries)  # the tasks' last bytes, before the commit's fsync
        for task in pending:
            markers[task.key] = {**results[task.name], "status": "computed"}
            writer.mark_written(task.key, markers[task.key]["crc"])
        if carried := sorted(k for k, m in markers.items() if m.get("nonfinite")):
            why = markers[carried[0]]["nonfinite"]
            message = (
                f"{len(carried)} tensor(s) written holding NaN or Inf, e.g. '{carried[0]}' ({why})"
            )
            session.emit("warning", {"message": message})
        session.emit("write", {"tensors": len(plan.tasks)})
        report = _report(plan, self.base, self.opened, markers, writer.final_files, session)
        report["summary"]["input_changes"] = self.changes
        report["summary"]["config"] = _config_summary(self.loras)
        return report


def _reused_markers(plan: MergePlan, writer, session: Session, fingerprint: str) -> dict:
    """Every tensor whose marker still vouches for its bytes in the reused temporary output."""
    markers: dict[str, dict] = {}
    stored = session.work.markers()
    for task in plan.tasks:
        marker = stored.get(task.key)
        if writer.final_file(task.key) in writer.reused and marker_valid(
            marker, fingerprint, writer.slot(task.key)
        ):
            markers[task.key] = {**marker, "status": "reused"}
            writer.mark_written(task.key, marker.get("crc", 0))
    return markers


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
        # write-behind where finish_writes (Merge.run) runs in the tasks' process
        functools.partial(run_merge_task, write_behind=session.in_process),
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
        tensor=task.key,
        read_bytes=task.read_bytes,
        reads=(task.base,),
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


def _report(plan, base, opened, markers, files, session: Session) -> dict:
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
        if marker.get("nonfinite"):
            tensors[task.key]["nonfinite"] = marker["nonfinite"]
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
        "dropped": plan.dropped,
        "warnings": [f"{lora.label}: {w}" for lora in opened for w in lora.warnings],
        "memory": memory_summary(session.budget, tensors),
        "task_seconds": task_seconds(m for m in markers.values() if m["status"] == "computed"),
    }
    inputs = {"source": base.path, "loras": [lora.label for lora in opened]}
    return build_report("merge", plan.options.to_dict(), inputs, tensors, extra, session.started)
