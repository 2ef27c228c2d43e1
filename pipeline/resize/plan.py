"""Resize planning from headers alone: one task per target weight, naming the LoRA tensors
that patch it (addresses, never data) with their factors strength · scale.

A target patched only by up/down pairs is refactored exactly (``lowrank``); one patched by any
full diff (or a bias, a modulation) is stored as the dense sum of its patches (``diff``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..io.reader import TensorInfo
from ..lora.inputs import LoraInput
from ..lora.keys import Unmatched
from ..lora.patches import PatchRef, collect_patches, describe
from ..lora.styles import KeyStyle
from .options import ResizeOptions


@dataclass(frozen=True)
class ResizeTask:
    key: str  # the weight patched (a base key, or the LoRA's own module name)
    kind: str  # "lowrank" | "diff"
    shape: tuple[int, ...]
    patches: tuple[PatchRef, ...]
    outputs: dict[str, str]  # role ("up", "down", "alpha", "diff") -> output key
    note: str | None = None

    @property
    def name(self) -> str:
        """Readable, stable Dask key."""
        return f"resize-{self.key}"

    @property
    def rank(self) -> int:
        """Rank of the exact sum's factorisation: Σ rᵢ, at most min(out, in); 0 for diffs."""
        if self.kind != "lowrank":
            return 0
        total = sum(p.down.shape[0] for p in self.patches)
        return min(total, self.shape[0], math.prod(self.shape[1:]))

    @property
    def memory_bytes(self) -> int:
        """Host memory the task allocates: its factors in fp64 (stacked, QR, products) or the
        dense fp64 sum and one product at a time."""
        if self.kind == "lowrank":
            total = sum(p.down.shape[0] for p in self.patches)
            return 8 * 4 * (self.shape[0] + math.prod(self.shape[1:])) * total
        return 8 * 2 * math.prod(self.shape)

    @property
    def read_bytes(self) -> int:
        return sum(t.nbytes for p in self.patches for t in p.tensors)

    @property
    def made_from(self) -> str:
        """What its output tensors are made from, for messages (``export/write.py``)."""
        return describe(self.patches)

    knob = "lower --strength"  # what scales the sum (``io/finite.output_fix``)


@dataclass(frozen=True)
class ResizePlan:
    options: ResizeOptions
    style: KeyStyle  # the options' key style for this model (``KeyStyle.for_model``)
    tasks: list[ResizeTask]  # sorted by key
    unmatched: list[list[Unmatched]]  # per LoRA, in the given order

    @property
    def total_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)


def plan_resize(
    targets: Mapping[str, TensorInfo], loras: Sequence[LoraInput], options: ResizeOptions
) -> ResizePlan:
    patches, unmatched = collect_patches(targets, loras)
    style = options.style.for_model(targets)
    tasks = []
    for key in sorted(patches):
        refs, shape = tuple(patches[key]), tuple(targets[key].shape)
        factored = len(shape) >= 2 and key.endswith(".weight")
        if factored and all(p.kind == "lowrank" for p in refs):
            tasks.append(ResizeTask(key, "lowrank", shape, refs, style.lowrank_names(key)))
            continue
        outputs = style.diff_outputs(key, shape)
        if outputs is None:
            reason = f"targets {key}: {style.cannot_hold(key)}"
            for p in refs:
                unmatched[p.lora] += [Unmatched(t.key, reason) for t in p.tensors]
            continue
        note = "a full diff patches it: stored as the dense sum" if factored else None
        tasks.append(ResizeTask(key, "diff", shape, refs, outputs, note))
    return ResizePlan(
        options, style, tasks, [sorted(u, key=lambda u: u.lora_key) for u in unmatched]
    )
