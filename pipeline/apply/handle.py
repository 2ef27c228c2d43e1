"""``apply``: LoRAs patched into a live model in place, and the handle that changes or removes
them. Each touched weight becomes the cast of W₀ + Σ sᵢ·scaleᵢ·upᵢ·downᵢ computed in fp32 on the
weight's own device, exactly as ``loraforge merge`` computes it, so the bytes are the same.

Originals: only touched weights are remembered, as copies (on their device, or on the CPU), or,
when ``checkpoint`` names the file the model was loaded from and it holds the same bytes (or
bytes whose cast to the weight's dtype are the weight's: a bf16 model loaded from fp32 files), as
addresses in that file, re-read through the memory map (and cast) when needed: then nothing is
held."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping

import torch

from loraforge.stages.merge import merge_weight

from ..errors import UsageError
from ..io import safetensors_format as stf
from ..io.reader import CheckpointIndex, TensorInfo, index_checkpoint, load_tensor
from ..lora.inputs import LoraInput, open_lora
from ..lora.keys import Unmatched
from ..lora.patches import PatchRef, collect_patches, load_deltas, refusal
from ..lora.summary import lora_summaries
from ..run.staging import thread_buffer
from .loraset import LoraSet

ORIGINALS = ("device", "cpu")


def apply(
    target: torch.nn.Module | Mapping[str, torch.Tensor],
    loras: LoraSet | Iterable,
    *,
    strict: bool = False,
    originals: str = "device",
    checkpoint: str | os.PathLike | CheckpointIndex | None = None,
    allow_nonfinite: bool = False,
) -> AppliedLoras:
    """Patch ``target`` (a module, through its ``state_dict`` names, or a state dict) in place
    with ``loras``; return the handle that changes strengths, adds or removes LoRAs and
    restores the original bytes. LoRA keys are matched with ``loraforge merge``'s rules; keys
    that patch nothing are listed in ``handle.unmatched`` (``strict`` refuses them).

    ``originals``: where copies of the touched weights' originals are kept, ``"device"`` (the
    weight's) or ``"cpu"``. ``checkpoint``: the safetensors file or shard directory the model
    was loaded from (or its ``CheckpointIndex``, its tensors keyed by the module's names); a
    touched weight whose bytes equal the stored tensor, or its cast to the weight's dtype, is
    re-read from it on removal instead of being copied."""
    handle = AppliedLoras(
        _tensors(target),
        originals=originals,
        checkpoint=checkpoint,
        strict=strict,
        allow_nonfinite=allow_nonfinite,
    )
    loras = loras if isinstance(loras, LoraSet) else LoraSet(loras)
    for spec in loras.specs:
        handle._loras.append(handle._open(spec))
    handle._update(set())
    return handle


class AppliedLoras:
    """What ``apply`` returns. ``held_bytes`` is what it keeps to restore the originals."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        originals: str = "device",
        checkpoint: str | os.PathLike | CheckpointIndex | None = None,
        strict: bool = False,
        allow_nonfinite: bool = False,
    ):
        if originals not in ORIGINALS:
            raise UsageError(f"originals={originals!r}; valid: {', '.join(ORIGINALS)}")
        self.tensors = tensors
        self.strict = strict
        self.allow_nonfinite = allow_nonfinite
        self._keep_on = originals
        self._checkpoint: CheckpointIndex | None = (
            checkpoint
            if checkpoint is None or isinstance(checkpoint, CheckpointIndex)
            else index_checkpoint(os.fspath(checkpoint))
        )
        infos = {key: _info(key, t) for key, t in tensors.items()}
        self._infos = {key: info for key, info in infos.items() if info is not None}
        self._loras: list[LoraInput] = []
        self._patches: dict[str, list[PatchRef]] = {}
        self._originals: dict[str, torch.Tensor | TensorInfo] = {}
        self.unmatched: list[list[Unmatched]] = []

    # ---- what is applied ----
    @property
    def loras(self) -> list[str]:
        return [lora.label for lora in self._loras]

    @property
    def strengths(self) -> list[float]:
        return [lora.strength for lora in self._loras]

    @property
    def touched(self) -> list[str]:
        """The weights now patched, sorted."""
        return sorted(self._patches)

    @property
    def held_bytes(self) -> int:
        """Bytes held to restore originals: copies of touched weights (0 for those re-read
        from ``checkpoint``)."""
        return sum(o.nbytes for o in self._originals.values() if isinstance(o, torch.Tensor))

    def summaries(self) -> list[dict]:
        """What each applied LoRA does, as a run's report lists it (``lora_summaries``): path,
        strength, keys, weights patched, and each key left out with why."""
        return lora_summaries(self._loras, self.unmatched)

    def check(self, loras: LoraSet | Iterable) -> list[dict]:
        """What ``replace(loras)`` would patch, without changing a weight: each LoRA's summary.
        With ``strict``, a LoRA that would leave keys out is refused as ``replace`` refuses
        it."""
        loras = loras if isinstance(loras, LoraSet) else LoraSet(loras)
        opened = [self._open(spec) for spec in loras.specs]
        return lora_summaries(opened, collect_patches(self._infos, opened)[1])

    # ---- changes ----
    def set_strengths(self, strengths: Iterable[float]) -> None:
        strengths = [float(s) for s in strengths]
        if len(strengths) != len(self._loras):
            raise UsageError(f"{len(strengths)} strengths for {len(self._loras)} LoRAs")
        before = set(self._patches)
        pairs = zip(self._loras, strengths, strict=True)
        self._loras = [dataclasses.replace(lora, strength=s) for lora, s in pairs]
        self._update(before)

    def add(self, lora, strength: float = 1.0) -> None:
        """Apply one more LoRA (a path, or a ``LoraSet`` entry) on top of the others."""
        before = set(self._patches)
        (spec,) = LoraSet([(lora, strength)]).specs
        self._loras.append(self._open(spec))
        self._update(before)

    def replace(self, loras: LoraSet | Iterable) -> None:
        """Switch to ``loras`` (all of them, in place of those applied) in one pass: each
        weight touched before or now is recomputed once from its original. Every LoRA is
        opened (and, with ``strict``, checked) before any weight changes."""
        before = set(self._patches)
        loras = loras if isinstance(loras, LoraSet) else LoraSet(loras)
        opened = [self._open(spec) for spec in loras.specs]
        self._loras = opened
        self._update(before)

    def remove_lora(self, which: int | str) -> None:
        """Take one LoRA off (by position, or by the path it was given as)."""
        labels = self.loras
        index = which if isinstance(which, int) else labels.index(os.path.abspath(which))
        before = set(self._patches)
        del self._loras[index]
        self._update(before)

    def remove(self) -> None:
        """Restore every touched weight's original bytes and forget every LoRA."""
        before = set(self._patches)
        self._loras = []
        self._update(before)

    # ---- internals ----
    def _open(self, spec) -> LoraInput:
        """Open one LoRA; with ``strict``, one that would leave keys out (or needs an
        assumption) is refused before anything is patched."""
        shapes = {key: info.shape for key, info in self._infos.items()}
        lora = open_lora(spec, shapes, None, self.allow_nonfinite)
        if self.strict:
            (left,) = collect_patches(self._infos, [lora])[1]
            if left:
                raise refusal(lora, left)
            if lora.warnings:
                raise UsageError(lora.warnings[0], path=lora.label)
        return lora

    def _update(self, before: set[str]) -> None:
        """Recompute every weight whose patches may have changed: those touched before and
        those touched now; a weight no longer touched gets its original back. Every weight
        still differing from its original is included, so after a failure part-way (a LoRA
        tensor holding NaN, say) ``remove()`` restores them all."""
        patches, unmatched = collect_patches(self._infos, self._loras)
        self._patches, self.unmatched = patches, unmatched
        for key in sorted(before | set(patches) | set(self._originals)):
            self._refresh(key)

    def _refresh(self, key: str) -> None:
        weight = self.tensors[key]
        patches = self._patches.get(key)
        if patches is None:
            if key in self._originals:
                with torch.no_grad():
                    weight.copy_(self._original(key))
                del self._originals[key]
            return
        self._remember(key)
        original = self._original(key)
        out = thread_buffer(tuple(weight.shape), torch.float32, weight.device, "apply")
        deltas = load_deltas(patches, weight.device, self.allow_nonfinite)
        merged = merge_weight(original, deltas, out=out)
        with torch.no_grad():
            weight.copy_(merged)  # the same rounding as merge's cast

    def _remember(self, key: str) -> None:
        if key in self._originals:
            return
        weight = self.tensors[key]
        stored = self._checkpoint.tensors.get(key) if self._checkpoint else None
        if stored is not None and stored.shape == tuple(weight.shape) and _same(stored, weight):
            self._originals[key] = stored
            return
        device = "cpu" if self._keep_on == "cpu" else weight.device
        self._originals[key] = weight.detach().to(device, copy=True)

    def _original(self, key: str) -> torch.Tensor:
        kept = self._originals[key]
        weight = self.tensors[key]
        if isinstance(kept, TensorInfo):  # the stored tensor, cast as the model's loader did
            return load_tensor(kept).to(weight.device, weight.dtype)
        return kept.to(weight.device)


def _tensors(target) -> dict[str, torch.Tensor]:
    if isinstance(target, torch.nn.Module):
        return dict(target.state_dict(keep_vars=True))
    if isinstance(target, Mapping):
        return dict(target)
    raise UsageError(
        f"apply() takes a torch.nn.Module or a state dict, got {type(target).__name__}"
    )


def _info(key: str, tensor: torch.Tensor) -> TensorInfo | None:
    code = stf.CODE_BY_DTYPE.get(tensor.dtype)
    return TensorInfo(key, "<model>", code, tuple(tensor.shape)) if code else None


def _same(stored: TensorInfo, weight: torch.Tensor) -> bool:
    """Whether the stored tensor, cast to the weight's dtype (a no-op when they agree), has the
    weight's bytes: then re-reading it gives the original back exactly."""
    if stored.scale is not None or not stored.is_float:
        return False
    tensor = load_tensor(stored).to(weight.dtype)
    return torch.equal(_bytes(tensor), _bytes(weight.detach().cpu()))


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)
