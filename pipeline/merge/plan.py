"""Merge planning from headers alone: one task per base tensor, decided before any data is read.

A task names its base tensor and the LoRA tensors that patch it (addresses, never data), each
with its factor strength · alpha · scale. The output holds every base key, sorted, at the base's
shapes, so its header(s) are fixed before the first tensor is computed."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..io import safetensors_format as stf
from ..io.layout import OutputEntry
from ..io.reader import CheckpointIndex, TensorInfo
from ..lora.inputs import LoraInput
from ..lora.keys import Unmatched
from ..lora.patches import PatchRef, collect_patches
from .options import MergeOptions


@dataclass(frozen=True)
class MergeTask:
    key: str
    kind: str  # "merged" | "cast" | "copied"
    base: TensorInfo
    out_dtype: str  # safetensors code
    patches: tuple[PatchRef, ...] = ()

    @property
    def name(self) -> str:
        """Readable, stable Dask key."""
        return f"{self.kind}-{self.key}"

    @property
    def read_bytes(self) -> int:
        return self.base.nbytes + sum(t.nbytes for p in self.patches for t in p.tensors)

    @property
    def entry(self) -> OutputEntry:
        return OutputEntry(self.key, self.out_dtype, self.base.shape)


@dataclass(frozen=True)
class MergePlan:
    options: MergeOptions
    tasks: list[MergeTask]  # sorted by key: the output's order
    unmatched: list[list[Unmatched]]  # per LoRA, in the merge's order

    @property
    def entries(self) -> list[OutputEntry]:
        return [t.entry for t in self.tasks]

    @property
    def total_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_merge(
    base: CheckpointIndex, loras: Sequence[LoraInput], options: MergeOptions
) -> MergePlan:
    out_code = stf.CODE_BY_DTYPE[options.torch_dtype]
    patches, unmatched = collect_patches(base.tensors, loras, options.alpha)

    tasks = []
    for key in sorted(base.tensors):
        info = base.tensors[key]
        code = out_code if info.is_float else info.dtype
        if key in patches:
            kind = "merged"
        elif code == info.dtype:
            kind = "copied"
        else:
            kind = "cast"
        tasks.append(MergeTask(key, kind, info, code, tuple(patches.get(key, ()))))
    return MergePlan(options, tasks, unmatched)
