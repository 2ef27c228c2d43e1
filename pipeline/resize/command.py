"""``resize``: open the LoRAs → plan one task per target weight → refactor the exact sums on
Dask into the work directory → choose ranks from the stored spectra → write one LoRA → report.

Every result keeps its whole spectrum, so another ``--rank``, ``--rank-mode`` or output option
with the same work directory is a re-export: nothing is computed again."""

from __future__ import annotations

import math

from ..errors import LoraMismatch
from ..io.reader import TensorInfo, index_checkpoint
from ..lora.config import MergeConfig
from ..lora.export import (
    RankedOutput,
    abort,
    export,
    lowrank_entry,
    open_outputs,
    outputs_summary,
    singular_values,
    written_beside,
)
from ..lora.inputs import LoraInput, find_weights, open_lora
from ..lora.keys import KOHYA_PREFIXES
from ..lora.modules import own_targets
from ..lora.paths import lora_paths
from ..lora.rank_options import ranked_outputs
from ..lora.summary import lora_summaries
from ..lora.writer import beside_directory, weights_file
from ..run.cluster import TaskCall
from ..run.faults import maybe_crash
from ..run.options import RunOptions
from ..run.paths import checkpoint_paths
from ..run.report import build_report
from ..run.session import Progress, Session
from .options import ResizeOptions
from .plan import ResizePlan, plan_resize
from .resume import resume_decisions
from .task import run_resize_task


def resize(
    *,
    loras: MergeConfig,
    output: str,
    options: ResizeOptions,
    base: str | None = None,
    base_type: str = "safetensors",
    lora_type: str | None = None,
    run: RunOptions | None = None,
    progress: Progress | None = None,
) -> dict:
    """Refactor Σ strengthᵢ·LoRAᵢ into one LoRA at the ranks ``options.rank_rule`` chooses;
    return the report (also saved as JSON). ``base`` (optional) only names the targets (kohya
    names need it); its tensors are never read."""
    run = beside_directory(run or RunOptions(device="cpu"), output, options.style)
    output = weights_file(output, options.style)
    session = Session.open("resize", run, output, options.output_format, progress)
    index = index_checkpoint(base, base_type) if base else None
    targets = index.tensors if index else _own_targets(loras, lora_type)
    shapes = {key: info.shape for key, info in targets.items()}
    opened = [open_lora(s, shapes, lora_type, options.allow_nonfinite) for s in loras.loras]
    inputs = lora_paths(opened, loras.path) + (checkpoint_paths("--base", index) if index else [])
    session.check_paths(inputs, written_beside(session.output, options.ranks, options.style))
    plan = plan_resize(targets, opened, options)
    _check_something_to_write(plan, opened)
    for warning in _warnings(opened, plan, index is None):
        session.emit("warning", {"message": warning})
    session.emit("loras", {"loras": lora_summaries(opened, plan.unmatched)})
    work = session.work
    with session.locked():
        if not run.resume:
            work.clear()
        work.create()
        session.write_manifest({"loras": [lora.file for lora in opened], "base": base})
        report, outputs = _run(plan, opened, session)
        report["summary"]["work_dir"] = work.path if run.keep_work else None
        try:
            session.publish([output.writer for output in outputs], report)
        except BaseException:
            abort(outputs)
            raise
    if not run.keep_work:
        work.remove()
    return report


def _own_targets(loras: MergeConfig, lora_type: str | None) -> dict[str, TensorInfo]:
    """Targets named from the LoRAs' own module names (no base given); the first LoRA to name
    a target gives its shape."""
    targets: dict[str, TensorInfo] = {}
    for spec in loras.loras:
        file, fmt, _config = find_weights(spec.path, lora_type)
        lora = index_checkpoint(file, fmt)
        own = own_targets({key: info.shape for key, info in lora.tensors.items()})
        for key, shape in own.items():
            targets.setdefault(key, TensorInfo(key, file, "F32", tuple(shape)))
    return targets


def _check_something_to_write(plan: ResizePlan, opened: list[LoraInput]) -> None:
    """A LoRA with no tensor at all is refused before any file is written, naming the first
    LoRA key left out and why (e.g. a diff the output style cannot hold)."""
    if plan.tasks:
        return
    first = next(((i, u[0]) for i, u in enumerate(plan.unmatched) if u), None)
    example = f", e.g. '{first[1].lora_key}': {first[1].reason}" if first else ""
    raise LoraMismatch(
        f"nothing to write in the {plan.options.style.name} style{example}",
        path=opened[first[0] if first else 0].label,
    )


def _warnings(opened: list[LoraInput], plan: ResizePlan, without_base: bool) -> list[str]:
    warnings = [f"{lora.label}: {w}" for lora in opened for w in lora.warnings]
    for lora, unmatched in zip(opened, plan.unmatched, strict=True):
        kohya = [u for u in unmatched if u.lora_key.startswith(KOHYA_PREFIXES)]
        if without_base and kohya:
            warnings.append(
                f"{lora.label}: {len(kohya)} kohya-named keys (e.g. '{kohya[0].lora_key}') "
                "are left out: only a base says which '_' is a '.'; pass --base"
            )
    return warnings


def _run(
    plan: ResizePlan, opened: list[LoraInput], session: Session
) -> tuple[dict, list[RankedOutput]]:
    """Resume decisions, compute, choose ranks, write the outputs' temporaries; return the
    report and the filled outputs (one per cap), for the caller to publish."""
    work = session.work
    options = plan.options
    fingerprints, reasons, markers = resume_decisions(plan, work)
    pending = [t for t in plan.tasks if reasons[t.key] is not None]
    session.start(
        tensors=len(plan.tasks),
        total_bytes=plan.total_bytes,
        done=len(plan.tasks) - len(pending),
        done_bytes=plan.total_bytes - sum(t.read_bytes for t in pending),
        changes=sorted({r for r in reasons.values() if r}),
    )

    def call(task) -> TaskCall:
        args = (task, work.path, fingerprints[task.key], options.allow_nonfinite)
        return TaskCall(task.name, run_resize_task, args, memory_bytes=task.memory_bytes)

    def recompute(task) -> dict:
        results = {}
        session.compute([call(task)], results.__setitem__)
        return results[task.name]

    by_name = {task.name: task for task in pending}

    def finished(name: str, marker: dict) -> None:
        task = by_name[name]
        markers[task.key] = marker
        maybe_crash("compute", len(markers))
        session.emit("tensor", {"key": task.key, "bytes": task.read_bytes})

    session.compute([call(task) for task in pending], finished)
    session.emit("write", {"tensors": len(plan.tasks)})
    values, notes = singular_values(plan.tasks, markers, work, recompute)
    paths = ranked_outputs(session.output, options.ranks, options.style.directory)
    outputs = open_outputs(
        plan.tasks,
        markers,
        values,
        paths,
        options.rank_rule,
        options.style,
        options.torch_dtype,
        options.output_format,
        options.max_shard_size,
    )
    try:
        notes.update(
            export(plan.tasks, markers, work, outputs, values, options.torch_dtype, recompute)
        )
    except BaseException:
        abort(outputs)
        raise
    report = _report(plan, opened, markers, reasons, notes, outputs, session)
    return report, outputs


def _report(plan, opened, markers, reasons, notes, outputs: list[RankedOutput], session) -> dict:
    tensors = {}
    for task in plan.tasks:
        marker, reason, note = markers[task.key], reasons[task.key], notes.get(task.key)
        entry = {"kind": task.kind, "shape": list(task.shape)}
        if task.kind == "lowrank":
            entry.update(lowrank_entry(task.key, outputs), full_rank=task.rank)
        else:
            error, kernel_error = outputs[-1].errors[task.key]
            entry.update(rank=None, rel_error=error, kernel_rel_error=kernel_error)
        entry.update(
            loras=[opened[p.lora].label for p in task.patches],
            seconds=marker.get("seconds"),
            status="recomputed" if note else "reused" if reason is None else "computed",
        )
        found = [n for n in (task.note, note, f"recomputed: {reason}" if reason else None) if n]
        if found:
            entry["note"] = "; ".join(found)
        tensors[task.key] = entry
    largest = outputs[-1]
    sq_norm = sum(s.sq_norm for s in largest.spectra.values())
    dropped = sum((1.0 - largest.kept_energy(k)) * s.sq_norm for k, s in largest.spectra.items())
    extra = {
        "files": [],
        "outputs": outputs_summary(outputs),
        "output": session.output,
        "device": "cpu",
        "computed": sum(1 for r in reasons.values() if r is not None),
        "reused": sum(1 for r in reasons.values() if r is None),
        "lowrank_params": largest.lowrank_params,
        "lowrank_rel_error": math.sqrt(dropped / sq_norm) if sq_norm else 0.0,
        "loras": lora_summaries(opened, plan.unmatched),
    }
    inputs = {"loras": [lora.label for lora in opened]}
    return build_report("resize", plan.options.to_dict(), inputs, tensors, extra, session.started)
