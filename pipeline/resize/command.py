"""``resize``: open the LoRAs → plan one task per target weight → refactor the exact sums on
Dask into the work directory → choose ranks from the stored spectra → write one LoRA → report.

Every result keeps its whole spectrum, so another ``--rank``, ``--rank-mode`` or output option
with the same work directory is a re-export: nothing is computed again."""

from __future__ import annotations

import math

from ..errors import LoraMismatch, ShapeMismatch, UsageError
from ..export.compute import compute_and_export
from ..export.outputs import lowrank_entry, outputs_summary
from ..export.write import Exported
from ..export.writer import lora_location
from ..io.reader import TensorInfo, index_checkpoint
from ..lora.config import MergeConfig
from ..lora.inputs import LoraInput, find_weights, open_lora
from ..lora.keys import KOHYA_PREFIXES
from ..lora.modules import kohya_keys, own_targets
from ..lora.paths import lora_paths
from ..lora.summary import lora_summaries
from ..run.cluster import TaskCall
from ..run.command import execute
from ..run.options import RunOptions
from ..run.paths import checkpoint_paths
from ..run.report import build_report
from ..run.session import Progress, Session
from .options import ResizeOptions
from .plan import ResizePlan, ResizeTask, plan_resize
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
    run, output = lora_location(run or RunOptions(device="cpu"), output, options.style)
    return execute(Resize(loras, options, base, base_type, lora_type), run, output, progress)


class Resize:
    """The resize filled into the command skeleton."""

    name = "resize"
    output_option = "--output"
    work = "results"

    def __init__(self, loras: MergeConfig, options: ResizeOptions, base, base_type, lora_type):
        self.loras, self.options = loras, options
        self.base, self.base_type, self.lora_type = base, base_type, lora_type
        self.output_format = options.output_format

    def prepare(self, session: Session) -> None:
        loras, options = self.loras, self.options
        index = index_checkpoint(self.base, self.base_type) if self.base else None
        targets = index.tensors if index else _own_targets(loras, self.lora_type)
        shapes = {key: info.shape for key, info in targets.items()}
        against = "the base" if index else "anything"
        self.opened = [
            open_lora(s, shapes, self.lora_type, options.allow_nonfinite, against)
            for s in loras.loras
        ]
        inputs = lora_paths(self.opened, loras.path)
        if index:
            inputs += checkpoint_paths("--base", index)
        session.check_paths(inputs, options.written_beside(session.output))
        self.plan = plan_resize(targets, self.opened, options)
        _check_something_to_write(self.plan, self.opened)
        for warning in _warnings(self.opened, self.plan, index is None):
            session.emit("warning", {"message": warning})
        session.emit("loras", {"loras": lora_summaries(self.opened, self.plan.unmatched)})

    def begin(self, session: Session, previous: dict | None) -> dict:
        return {"loras": [lora.file for lora in self.opened], "base": self.base}

    def run(self, session: Session) -> dict:
        """Resume decisions, compute, choose ranks, write the outputs' temporaries; the
        report."""
        plan, options = self.plan, self.options
        fingerprints, reasons, markers = resume_decisions(plan, session.work)
        calls = {t.key: _call(t, session, fingerprints[t.key], options) for t in plan.tasks}
        pending = [t for t in plan.tasks if reasons[t.key] is not None]
        changes = sorted({r for r in reasons.values() if r})
        exported = compute_and_export(
            plan, session, calls, pending, markers, changes, checked=not options.allow_nonfinite
        )
        return _report(plan, self.opened, markers, reasons, exported, session)


def _call(task: ResizeTask, session: Session, fingerprint: dict, options) -> TaskCall:
    return TaskCall(
        task.name,
        run_resize_task,
        (task, session.work.path, fingerprint, options.allow_nonfinite),
        memory_bytes=task.memory_bytes,
        tensor=task.key,
        read_bytes=task.read_bytes,
    )


def _own_targets(loras: MergeConfig, lora_type: str | None) -> dict[str, TensorInfo]:
    """Targets named from the LoRAs' own module names (no base given). LoRAs summed must agree
    on each target's shape, and a LoRA must name at least one target itself: one with only
    kohya names needs ``--base``, as convert says."""
    targets: dict[str, TensorInfo] = {}
    for spec in loras.loras:
        file, fmt, _config = find_weights(spec.path, lora_type)
        shapes = {key: info.shape for key, info in index_checkpoint(file, fmt).tensors.items()}
        own = own_targets(shapes)
        if not own and (kohya := kohya_keys(shapes)):
            example = next((k for k in kohya if not k.endswith(".alpha")), kohya[0])
            raise UsageError(
                f"kohya names ('{example}') map back to module names only through the model "
                "they patch",
                path=file,
                hint="pass --base MODEL",
            )
        for key, shape in own.items():
            first = targets.setdefault(key, TensorInfo(key, file, "F32", tuple(shape)))
            if first.shape != tuple(shape):
                raise ShapeMismatch(
                    f"its delta of {key} is {_dims(shape)}, but {first.file}'s is "
                    f"{_dims(first.shape)}: LoRAs summed must patch the same shapes",
                    path=file,
                    hint="are they for different models? pass --base MODEL to check each "
                    "against the model",
                )
    return targets


def _dims(shape) -> str:
    return "x".join(map(str, shape))


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


def _report(plan, opened, markers, reasons, exported: Exported, session) -> dict:
    notes, outputs = exported.notes, exported.outputs
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
        "clients": exported.report_clients(plan, tensors),
        "lowrank_params": largest.lowrank_params,
        "lowrank_rel_error": math.sqrt(dropped / sq_norm) if sq_norm else 0.0,
        "loras": lora_summaries(opened, plan.unmatched),
    }
    inputs = {"loras": [lora.label for lora in opened]}
    return build_report("resize", plan.options.to_dict(), inputs, tensors, extra, session.started)
