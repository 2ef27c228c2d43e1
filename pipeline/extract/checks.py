"""Surprising plans made loud: nothing to extract is an error; tensors the LoRA will not hold
although they differ (a shape mismatch, a changed tensor LightX2V's naming cannot carry) are
warnings naming the first and the count."""

from __future__ import annotations

import torch

from ..errors import ModelMismatch
from ..io.reader import CheckpointIndex, TensorInfo, mapped
from .plan import ExtractionPlan


def check_something_to_extract(
    plan: ExtractionPlan, source: CheckpointIndex, target: CheckpointIndex
) -> None:
    if plan.tasks:
        return
    scales = {**source.fp8.companions, **target.fp8.companions}  # not weights: not counted
    skipped = [s for s in plan.skipped if s.key not in scales]
    if not skipped:
        raise ModelMismatch(
            f"shares no tensor name with the base {source.path} "
            f"(base has e.g. '{_first(source)}', this one '{_first(target)}')",
            path=target.path,
            hint="check --source-model and --target-model",
        )
    first = skipped[0]
    raise ModelMismatch(
        f"none of the {len(skipped)} tensors it shares with the base can be extracted, "
        f"e.g. '{first.key}': {first.reason}",
        path=target.path,
        hint="check --source-model and --target-model",
    )


def check_changed(markers: dict[str, dict], target: CheckpointIndex) -> None:
    """After the compute: a fine-tune equal to the base in every tensor extracted would give
    an empty LoRA, which nothing can load; refused (finished tensors stay for the rerun)."""
    if markers and all(m["kind"] == "unchanged" for m in markers.values()):
        raise ModelMismatch(
            f"equals the base in all {_count(len(markers))} compared (max |diff| <= 1e-8), so "
            "the LoRA would be empty",
            path=target.path,
            hint="check --source-model and --target-model",
        )


def surprises(plan: ExtractionPlan, source: CheckpointIndex, target: CheckpointIndex) -> list[str]:
    """Warnings for tensors that differ between the models but are not in the LoRA."""
    shapes = [s for s in plan.skipped if s.reason.startswith("shape mismatch")]
    scales = {**source.fp8.companions, **target.fp8.companions}  # applied with their weights
    changed = [
        s
        for s in plan.skipped
        if s not in shapes
        and s.key not in scales
        and _differ(source.tensors[s.key], target.tensors[s.key])
    ]
    warnings = []
    if shapes:
        warnings.append(
            f"{_count(len(shapes))} not in the LoRA because the shape differs between the "
            f"models, e.g. '{shapes[0].key}': {shapes[0].reason}"
        )
    if changed:
        warnings.append(
            f"{_count(len(changed))} changed but not in the LoRA, "
            f"e.g. '{changed[0].key}': {changed[0].reason}"
        )
    floors = budget_floors(plan)
    if floors:
        warnings.append(floors)
    return warnings


def budget_floors(plan: ExtractionPlan) -> str | None:
    """Said before any SVD runs: a --rank-budget below the --min-rank floors of every planned
    low-rank tensor is refused once all are factored, unless enough of them turn out unchanged
    (they then need no rank). On a large model that is after hours of work."""
    rule = plan.options.rank_rule
    if rule.mode != "budget":
        return None
    lowrank = [t for t in plan.tasks if t.kind == "lowrank"]
    floor = sum(min(rule.min_rank, t.rank) * sum(t.shape) for t in lowrank)
    if floor <= rule.rank_budget:
        return None
    return (
        f"--rank-budget {rule.rank_budget} is below the --min-rank {rule.min_rank} floors of the "
        f"{_count(len(lowrank))} planned low rank ({floor} parameters): the export will refuse "
        "it unless enough of them turn out unchanged; the factors are kept for a rerun"
    )


def _differ(a: TensorInfo, b: TensorInfo) -> bool:
    """Whether two stored tensors hold different bytes (read through the memory map; the
    tensors skipped this way are few and small)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return True
    with mapped(a) as x, mapped(b) as y:
        return x.numel() > 0 and not torch.equal(
            x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)
        )


def _count(n: int) -> str:
    return f"{n} tensor{'s' if n != 1 else ''}"


def _first(index: CheckpointIndex) -> str:
    return min(index.tensors) if index.tensors else "nothing"
