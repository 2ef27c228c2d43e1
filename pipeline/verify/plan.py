"""Verification planning from headers alone: one task per tensor the base and the fine-tuned
checkpoint share (same shape, float), naming the LoRA tensors that patch it by address.
Scaled-fp8 bookkeeping (scales, markers) is compared with its weight, never on its own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..io.reader import CheckpointIndex, TensorInfo
from ..lora.inputs import LoraInput
from ..lora.keys import Unmatched
from ..lora.patches import PatchRef, collect_patches
from .options import VerifyOptions


@dataclass(frozen=True)
class VerifyTask:
    key: str
    base: TensorInfo
    target: TensorInfo
    patches: tuple[PatchRef, ...] = ()

    @property
    def name(self) -> str:
        """Readable, stable Dask key."""
        return f"verify-{self.key}"

    @property
    def read_bytes(self) -> int:
        return (
            self.base.nbytes
            + self.target.nbytes
            + sum(t.nbytes for p in self.patches for t in p.tensors)
        )


@dataclass(frozen=True)
class VerifyPlan:
    options: VerifyOptions
    tasks: list[VerifyTask]  # sorted by key
    unmatched: list[list[Unmatched]]  # per LoRA: keys that patch nothing
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why it is not compared
    uncompared: dict[str, str] = field(default_factory=dict)  # patched but not compared: why
    source_only: list[str] = field(default_factory=list)
    target_only: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)


def plan_verify(
    base: CheckpointIndex,
    target: CheckpointIndex,
    loras: Sequence[LoraInput],
    options: VerifyOptions,
) -> VerifyPlan:
    patches, unmatched = collect_patches(base.tensors, loras, options.alpha)
    companions = set(base.fp8.companions) | set(target.fp8.companions)
    tasks, skipped = [], {}
    for key in sorted((set(base.tensors) & set(target.tensors)) - companions):
        b, t = base.tensors[key], target.tensors[key]
        if b.shape != t.shape:
            skipped[key] = f"shape mismatch: {list(b.shape)} vs {list(t.shape)}"
        elif not (b.is_float and t.is_float):
            skipped[key] = f"not a float tensor ({b.dtype}/{t.dtype})"
        else:
            tasks.append(VerifyTask(key, b, t, tuple(patches.get(key, ()))))
    compared = {task.key for task in tasks}
    uncompared = {
        key: skipped.get(key, "not in the target model")
        for key in sorted(patches)
        if key not in compared
    }
    return VerifyPlan(
        options,
        tasks,
        unmatched,
        skipped,
        uncompared,
        source_only=sorted(set(base.tensors) - set(target.tensors) - companions),
        target_only=sorted(set(target.tensors) - set(base.tensors) - companions),
    )
