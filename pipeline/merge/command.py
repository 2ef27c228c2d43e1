"""``merge``: open the LoRAs → plan from headers → lay out the output → one Dask task per base
tensor writes its bytes in place → commit (fsync, rename) → report.

Resume (``resume.py``): the work directory holds the plan's fingerprint (``run.json``) and one
marker per tensor written; a rerun of the same merge computes only the tensors without one."""

from __future__ import annotations

from ..errors import LoraMismatch, ShapeMismatch
from ..io.layout import output_files
from ..io.reader import index_checkpoint
from ..io.writer import open_output
from ..lora.config import MergeConfig
from ..lora.inputs import LoraInput, open_lora
from ..run.cluster import TaskCall
from ..run.faults import maybe_crash
from ..run.options import RunOptions
from ..run.report import build_report
from ..run.session import Progress, Session
from .options import MergeOptions
from .plan import MergePlan, MergeTask, plan_merge
from .resume import changes_since, components_digest, marker_valid, merge_components
from .task import run_merge_task

METADATA = {"format": "pt", "producer": "loraforge"}


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
    plan = plan_merge(base, opened, options)
    inputs = [base, *(lora.index for lora in opened)]
    session.check_outputs(
        output_files(session.output, plan.entries, options.max_shard_size),
        [info.file for index in inputs for info in index.tensors.values()],
    )
    if options.strict:
        _refuse_unmatched(opened, plan)
    session.emit("loras", {"loras": _lora_summaries(opened, plan)})

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
            metadata=METADATA,
            reuse=same,
        )
        work.write_manifest(
            {"command": "merge", "fingerprint": fingerprint, "components": components}
        )
        try:
            markers = _run(plan, writer, session, fingerprint, changes)
            session.emit("write", {"tensors": len(plan.tasks)})
            files = writer.commit()
        except BaseException:
            writer.close()  # the temporaries stay for a resumed run
            raise
    work.remove()
    return session.finish(_report(plan, base, opened, markers, files, session, changes))


def _lora_summaries(opened: list[LoraInput], plan: MergePlan) -> list[dict]:
    return [
        {
            "path": lora.label,
            "file": lora.file,
            "strength": lora.strength,
            "peft": lora.peft,
            "keys": len(lora.index.tensors),
            "patches": len(lora.mapping.patches),
            "unmatched": {u.lora_key: u.reason for u in unmatched},
        }
        for lora, unmatched in zip(opened, plan.unmatched, strict=True)
    ]


def _refuse_unmatched(opened: list[LoraInput], plan: MergePlan) -> None:
    """``--strict``: any LoRA key that would not be merged stops the run; a shape mismatch is
    named first, since it is the likeliest sign of a LoRA made for another model."""
    for lora, unmatched in zip(opened, plan.unmatched, strict=True):
        if not unmatched:
            continue
        shaped = [u for u in unmatched if u.reason.startswith("shape mismatch")]
        first = (shaped or unmatched)[0]
        error = ShapeMismatch if shaped else LoraMismatch
        raise error(
            f"{len(unmatched)} of its {len(lora.index.tensors)} keys would not be merged, "
            f"e.g. '{first.lora_key}': {first.reason}",
            path=lora.file,
            hint="without --strict they are skipped and listed in the report",
        )


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
    dev = session.device
    calls = [
        TaskCall(
            task.name,
            run_merge_task,
            (
                task,
                writer.slot(task.key),
                session.work.path,
                dev,
                {"fingerprint": fingerprint},
                options.allow_nonfinite,
            ),
            uses_gpu=dev.startswith("cuda") and task.kind == "merged",
        )
        for task in pending
    ]
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
            "shape": list(task.base.shape),
            "dtype": task.out_dtype,
            "loras": [opened[p.lora].label for p in task.patches],
            "seconds": marker.get("seconds"),
            "status": marker["status"],
        }
    extra = {
        "files": files,
        "output": session.output,
        "device": session.device,
        "computed": sum(1 for m in markers.values() if m["status"] == "computed"),
        "reused": sum(1 for m in markers.values() if m["status"] == "reused"),
        "loras": _lora_summaries(opened, plan),
        "input_changes": changes,
        "work_dir": None,
    }
    inputs = {"source": base.path, "loras": [lora.label for lora in opened]}
    return build_report("merge", plan.options.to_dict(), inputs, tensors, extra, session.started)
