"""``verify``: index B, F and the LoRAs → plan one task per shared tensor → stream each tensor's
error sums on Dask → the report (per tensor, total, worst). Reads only; writes nothing but the
report, and that only with ``--report``.

Definitions (also in the report's ``summary.definition``): per tensor, with the LoRA delta
D = Σ fᵢ·Δᵢ (fᵢ = strength · alpha · scale, as ``merge`` applies it),
rel_error = ‖B + D − F‖_F / ‖F − B‖_F; the total is √(Σ‖B + D − F‖²) / √(Σ‖F − B‖²) over every
tensor compared, so tensors that changed the most weigh the most. Sums are fp64."""

from __future__ import annotations

import math

from ..errors import ModelMismatch
from ..io.reader import index_checkpoint
from ..lora.config import MergeConfig
from ..lora.inputs import open_lora
from ..lora.paths import lora_paths
from ..lora.summary import lora_summaries
from ..run.cluster import TaskCall
from ..run.options import RunOptions
from ..run.paths import check_two_models, checkpoint_paths
from ..run.report import build_report
from ..run.session import Progress, Session
from .options import VerifyOptions
from .plan import VerifyPlan, plan_verify
from .task import BLOCK_ELEMENTS, run_verify_task

DEFINITION = (
    "rel_error = ||B + D - F|| / ||F - B|| (Frobenius, fp64), D = sum of strength * alpha * "
    "scale * up @ down (or * diff) over the LoRAs; total = sqrt(sum ||B + D - F||^2) / "
    "sqrt(sum ||F - B||^2) over the tensors compared"
)


def verify(
    *,
    source_model: str,
    target_model: str,
    loras: MergeConfig,
    options: VerifyOptions,
    run: RunOptions | None = None,
    source_type: str = "safetensors",
    target_type: str = "safetensors",
    lora_type: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """How closely ``source_model`` + ``loras`` reproduce ``target_model``: the report (saved
    as JSON when ``run.report`` is set). ``summary.passed`` is False above
    ``options.max_error``; the caller decides what that means for the exit code."""
    run = run or RunOptions()
    session = Session.open_read_only("verify", run, progress)
    base = index_checkpoint(source_model, source_type)
    target = index_checkpoint(target_model, target_type)
    check_two_models(base.path, target.path)
    shapes = {key: info.shape for key, info in base.tensors.items()}
    opened = [open_lora(spec, shapes, lora_type) for spec in loras.loras]
    session.check_paths(
        checkpoint_paths("--source-model", base)
        + checkpoint_paths("--target-model", target)
        + lora_paths(opened, loras.path)
    )
    plan = plan_verify(base, target, opened, options)
    if not plan.tasks:
        raise ModelMismatch(
            f"shares no comparable tensor with the base {base.path}",
            path=target.path,
            hint="check --source-model and --target-model",
        )
    warnings = [f"{lora.label}: {warning}" for lora in opened for warning in lora.warnings]
    if plan.uncompared:
        key, why = next(iter(plan.uncompared.items()))
        warnings.append(
            f"{len(plan.uncompared)} tensors the LoRAs patch are not compared (not in the "
            f"total), e.g. '{key}': {why}"
        )
    for warning in warnings:
        session.emit("warning", {"message": warning})
    session.emit("loras", {"loras": lora_summaries(opened, plan.unmatched)})
    session.start_tasks(plan.tasks, plan.tasks, changes=[])
    calls = [
        TaskCall(
            task.name,
            run_verify_task,
            (task,),
            memory_bytes=4 * 8 * BLOCK_ELEMENTS,
            tensor=task.key,
            read_bytes=task.read_bytes,
        )
        for task in plan.tasks
    ]
    done = session.compute(calls)
    results = {task.key: done[task.name] for task in plan.tasks}
    if not any(result["change_sq"] for result in results.values()):
        raise ModelMismatch(
            f"equals the base in all {len(results)} tensors compared, so no error can be "
            "measured against the change",
            path=target.path,
            hint="pass the fine-tuned checkpoint as --target-model",
        )
    session.emit("write", {"tensors": len(plan.tasks)})
    report = _report(plan, opened, results, session, base.path, target.path)
    report["summary"]["warnings"] = warnings
    if run.report:
        session.save_report(report)
    return report


def _ratio(error_sq: float, change_sq: float) -> float | None:
    """√(error² / change²); 0 when both are 0; None (not a number) when only the change is."""
    if change_sq > 0.0:
        return math.sqrt(error_sq / change_sq)
    return 0.0 if error_sq == 0.0 else None


def _report(plan: VerifyPlan, opened, results: dict, session: Session, base, target) -> dict:
    tensors = {}
    for task in plan.tasks:
        result = results[task.key]
        error_sq, change_sq = result["error_sq"], result["change_sq"]
        entry = {
            "kind": "patched" if task.patches else "untouched",
            "shape": list(task.base.shape),
            "rel_error": _ratio(error_sq, change_sq),
            "error_norm": math.sqrt(error_sq),
            "change_norm": math.sqrt(change_sq),
            "loras": [opened[p.lora].label for p in task.patches],
            "seconds": result["seconds"],
            "status": "computed",
        }
        if entry["rel_error"] is None:
            entry["note"] = "F equals B here, but B + LoRA does not"
        tensors[task.key] = entry
    for key, reason in plan.skipped.items():
        tensors[key] = {"kind": "skipped", "note": reason, "status": "planned"}
    error_sq = math.fsum(r["error_sq"] for r in results.values())
    change_sq = math.fsum(r["change_sq"] for r in results.values())
    total = _ratio(error_sq, change_sq)
    options: VerifyOptions = plan.options
    compared = [(k, e) for k, e in tensors.items() if e["kind"] != "skipped"]
    compared.sort(key=lambda item: (-_rank(item[1]["rel_error"]), item[0]))
    extra = {
        "files": [],
        "output": None,
        "device": session.device,
        "computed": len(results),
        "reused": 0,
        "definition": DEFINITION,
        "rel_error": total,
        "error_norm": math.sqrt(error_sq),
        "change_norm": math.sqrt(change_sq),
        "max_error": options.max_error,
        "passed": None if options.max_error is None else _passes(total, options.max_error),
        "worst": [
            {"key": key, "rel_error": e["rel_error"], "error_norm": e["error_norm"]}
            for key, e in compared[: options.worst]
        ],
        "uncompared": plan.uncompared,
        "source_only": plan.source_only,
        "target_only": plan.target_only,
        "loras": lora_summaries(opened, plan.unmatched),
    }
    inputs = {"source": base, "target": target, "loras": [lora.label for lora in opened]}
    return build_report("verify", options.to_dict(), inputs, tensors, extra, session.started)


def _rank(value: float | None) -> float:
    return math.inf if value is None else value


def _passes(total: float | None, max_error: float) -> bool:
    return total is not None and total <= max_error
