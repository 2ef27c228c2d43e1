"""Which LoRA tensors patch which weight, with what factor, and loading them: shared by every
consumer of LoRAs (``merge`` writes a new checkpoint, ``apply`` patches a live model).

A patch names its LoRA tensors by address (``TensorInfo``), never by data, with its factor
strength · global alpha · the LoRA's scale for that module."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from loraforge.stages.merge import Delta

from ..errors import LoraMismatch, NonFiniteTensor, ShapeMismatch, UsageError
from ..io.finite import is_finite
from ..io.reader import TensorInfo, load_tensor, mapped
from .inputs import LoraInput, telling
from .keys import Unmatched
from .numbers import RANGE, in_range


@dataclass(frozen=True)
class PatchRef:
    lora: int  # position of the LoRA in its list
    kind: str  # "lowrank" | "diff"
    factor: float  # strength · global alpha · the LoRA's scale for this module
    up: TensorInfo | None = None
    down: TensorInfo | None = None
    diff: TensorInfo | None = None
    strength: float = field(default=1.0, compare=False)  # the LoRA's, for messages
    scale: float = field(default=1.0, compare=False)  # global alpha · the module's scale

    @property
    def tensors(self) -> list[TensorInfo]:
        return [t for t in (self.up, self.down, self.diff) if t is not None]

    def describe(self) -> str:
        """What makes this factor, for messages: the LoRA file, strength and scale."""
        return f"{self.tensors[0].file} at strength {self.strength:g} × scale {self.scale:g}"


def describe(patches: Sequence[PatchRef]) -> str:
    """The LoRAs of ``patches`` with their strengths and scales, for messages."""
    return " + ".join(patch.describe() for patch in patches) or "no LoRA"


def collect_patches(
    targets: Mapping[str, TensorInfo], loras: Sequence[LoraInput], alpha: float = 1.0
) -> tuple[dict[str, list[PatchRef]], list[list[Unmatched]]]:
    """Per target key, the patches of every LoRA in order; per LoRA, the keys left out (its
    mapping's, plus patches that cannot apply: a non-float target or LoRA tensor)."""
    patches: dict[str, list[PatchRef]] = {}
    unmatched: list[list[Unmatched]] = []
    for i, lora in enumerate(loras):
        left = list(lora.mapping.unmatched)
        for patch in lora.mapping.patches:
            roles = {"up": patch.up_key, "down": patch.down_key, "diff": patch.diff_key}
            tensors = {r: lora.index.tensors[k] for r, k in roles.items() if k is not None}
            reason = _unusable(targets[patch.base_key], tensors.values())
            if reason:
                left += [Unmatched(info.key, reason) for info in tensors.values()]
                continue
            scale = alpha * patch.scale
            factor = lora.strength * scale
            _check_factor(factor, lora, scale, tensors)
            patches.setdefault(patch.base_key, []).append(
                PatchRef(i, patch.kind, factor, **tensors, strength=lora.strength, scale=scale)
            )
        unmatched.append(sorted(left, key=lambda u: u.lora_key))
    return patches, unmatched


def _check_factor(factor: float, lora: LoraInput, scale: float, tensors: dict) -> None:
    """A factor of checked numbers can still leave float32's range as their product (a large
    strength times a large alpha / rank): refused before any work. NaN or Inf from a
    non-finite alpha read with ``--allow-nonfinite`` is left to that flag."""
    if in_range(factor) or not (math.isfinite(lora.strength) and math.isfinite(scale)):
        return
    info = next(iter(tensors.values()))
    raise UsageError(
        f"strength {lora.strength:g} × scale {scale:g} = {factor:g} is outside {RANGE}",
        path=lora.file,
        key=info.key,
        hint="lower the strength (or the alpha)",
    )


def _unusable(target: TensorInfo, tensors) -> str:
    if not target.is_float:
        return f"targets {target.key}, which is {target.dtype} and cannot be patched"
    for info in tensors:
        if not info.is_float:
            return f"{info.key} is {info.dtype}, not a float tensor"
    return ""


def _finite(tensor: torch.Tensor, info: TensorInfo, allow: bool) -> None:
    if not allow and not is_finite(tensor):
        raise NonFiniteTensor(
            "holds NaN or Inf",
            path=info.file,
            key=info.key,
            hint="fix the LoRA, or pass --allow-nonfinite to merge it anyway",
        )


def load_deltas(
    patches: Sequence[PatchRef], device: torch.device, allow_nonfinite: bool = False
) -> Iterator[Delta]:
    """Each patch's tensors on ``device``, loaded only when the merge stage asks for them."""
    for patch in patches:
        if patch.diff is not None:
            with mapped(patch.diff) as diff:
                _finite(diff, patch.diff, allow_nonfinite)
                yield Delta(patch.factor, diff=diff.to(device))
            continue
        up, down = load_tensor(patch.up), load_tensor(patch.down)
        _finite(up, patch.up, allow_nonfinite)
        _finite(down, patch.down, allow_nonfinite)
        yield Delta(patch.factor, up=up.to(device), down=down.to(device))


def refusal(lora: LoraInput, unmatched: list[Unmatched]) -> LoraMismatch:
    """The ``--strict`` error for ``lora``'s keys left out: the count per cause, a shape
    mismatch first (the likeliest sign of a LoRA made for another model), one example."""
    by_cause: dict[str, list] = {}
    for u in unmatched:
        by_cause.setdefault(u.reason.split(":")[0], []).append(u)
    first, _hint = telling(unmatched)  # the most telling key, not an alpha it left over
    lead = first.reason.split(":")[0]
    causes = sorted(by_cause, key=lambda c: (c != lead, not c.startswith("shape mismatch"), c))
    counts = ", ".join(f"{len(by_cause[c])} {c}" for c in causes)
    counts = f" ({counts})" if len(causes) > 1 else ""
    error = ShapeMismatch if lead.startswith("shape mismatch") else LoraMismatch
    return error(
        f"{len(unmatched)} of its {len(lora.index.tensors)} keys would not be merged{counts}, "
        f"e.g. '{first.lora_key}': {first.reason}",
        path=lora.file,
        hint="every key is listed in the report; without --strict they are skipped",
    )
