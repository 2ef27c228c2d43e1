"""``apply``: LoRAs patched into a live model in place, and the handle that changes or removes
them. Each touched weight becomes the cast of W₀ + Σ sᵢ·scaleᵢ·upᵢ·downᵢ computed in fp32 on the
weight's own device, exactly as ``loraforge merge`` computes it, so the bytes are the same.

All or nothing: ``apply()`` and every handle method check what they are given first, then
write the weights one by one, each checked finite before it is written; if anything fails on
the way, the weights already written are put back as they were (recomputed from their
originals, which gives the same bytes), so the model and the handle are exactly as before and
the error is raised. Originals are kept once per storage (``originals.py``): a weight tied
under two names gets the patches of both, once, and its original back. A weight another live
handle has patched is refused: that handle alone can restore it."""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Iterable, Mapping

import torch

from loraforge.stages.merge import merge_weight

from ..errors import AlreadyPatched, ArgumentTypeError, NotApplied, RestoreFailed, UsageError
from ..io import safetensors_format as stf
from ..io.finite import casts_finite, check_written, is_finite
from ..io.reader import CheckpointIndex, TensorInfo
from ..lora.inputs import LoraInput, open_lora
from ..lora.keys import Unmatched
from ..lora.patches import PatchRef, collect_patches, describe, load_deltas, refusal
from ..lora.summary import lora_summaries
from ..run.staging import thread_buffer
from .loraset import LoraSet, strength_value
from .originals import Originals, Storage, storage_of

ORIGINALS = ("device", "cpu")
_LIVE: dict[Storage, weakref.ref] = {}  # storage -> the live handle that patched it


def apply(
    target: torch.nn.Module | Mapping[str, torch.Tensor],
    loras: LoraSet | Iterable | str | os.PathLike,
    *,
    strict: bool = False,
    originals: str = "device",
    checkpoint: str | os.PathLike | CheckpointIndex | None = None,
    allow_nonfinite: bool = False,
) -> AppliedLoras:
    """Patch ``target`` (a module, through its ``state_dict`` names, or a state dict) in place
    with ``loras`` (a ``LoraSet``, a list of paths or ``(path, strength)``, or one path);
    return the handle that changes strengths, adds or removes LoRAs and restores the original
    bytes. LoRA keys are matched with ``loraforge merge``'s rules; keys that patch nothing are
    listed in ``handle.unmatched`` (``strict`` refuses them). On any error the target is left
    exactly as it was.

    ``originals``: where copies of the touched weights' originals are kept, ``"device"`` (the
    weight's) or ``"cpu"``. ``checkpoint``: the safetensors file or shard directory the model
    was loaded from (or its ``CheckpointIndex``, its tensors keyed by the model's names); a
    touched weight whose bytes equal the stored tensor, or its cast to the weight's dtype (a
    bf16 model loaded from fp32 files), is re-read from it when needed instead of being copied
    (the file is fingerprinted now and checked then)."""
    loras = _lora_set(loras)
    handle = AppliedLoras(
        _tensors(target),
        originals=originals,
        checkpoint=checkpoint,
        strict=strict,
        allow_nonfinite=allow_nonfinite,
    )
    handle._change([handle._open(spec) for spec in loras.specs])
    return handle


class AppliedLoras:
    """What ``apply`` returns. ``held_bytes`` is what it keeps to restore the originals."""

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        *,
        originals: str = "device",
        checkpoint: str | os.PathLike | None = None,
        strict: bool = False,
        allow_nonfinite: bool = False,
    ):
        if originals not in ORIGINALS:
            raise UsageError(f"originals={originals!r}; valid: {', '.join(ORIGINALS)}")
        self.tensors = tensors
        self.strict = strict
        self.allow_nonfinite = allow_nonfinite
        self._originals = Originals(originals, checkpoint)
        self._storage = {key: storage_of(t) for key, t in tensors.items()}
        first: dict[Storage, str] = {}
        for key in sorted(tensors):
            first.setdefault(self._storage[key], key)
        self._weight = {key: first[storage] for key, storage in self._storage.items()}
        infos = {key: _info(key, t) for key, t in tensors.items()}
        self._infos = {key: info for key, info in infos.items() if info is not None}
        self._loras: list[LoraInput] = []
        self._touched: list[str] = []
        self._patches: dict[str, list[PatchRef]] = {}  # by weight (a tied one's first name)
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
        """The names LoRA keys patch now, sorted (a tied weight is listed under each)."""
        return list(self._touched)

    @property
    def held_bytes(self) -> int:
        """Bytes held to restore originals: one copy per touched storage (0 for those re-read
        from ``checkpoint``)."""
        return self._originals.held_bytes

    def summaries(self) -> list[dict]:
        """What each applied LoRA does, as a run's report lists it (``lora_summaries``): path,
        strength, keys, weights patched, and each key left out with why."""
        return lora_summaries(self._loras, self.unmatched)

    def check(self, loras: LoraSet | Iterable) -> list[dict]:
        """What ``replace(loras)`` would patch, without changing a weight: each LoRA's summary.
        With ``strict``, a LoRA that would leave keys out is refused as ``replace`` refuses
        it."""
        opened = [self._open(spec) for spec in _lora_set(loras).specs]
        return lora_summaries(opened, self._plan(opened)[2])

    # ---- changes: each all or nothing ----
    def set_strengths(self, strengths: Iterable[float]) -> None:
        """One strength per LoRA, in order; each recomputed from the originals."""
        if isinstance(strengths, (str, bytes)) or not isinstance(strengths, Iterable):
            raise ArgumentTypeError(
                f"set_strengths takes a list of numbers, one per LoRA, got {strengths!r}"
            )
        strengths = list(strengths)
        if len(strengths) != len(self._loras):
            raise UsageError(f"{len(strengths)} strengths for {len(self._loras)} LoRAs")
        values = [
            strength_value(s, lora.label) for s, lora in zip(strengths, self._loras, strict=True)
        ]
        pairs = zip(self._loras, values, strict=True)
        self._change([dataclasses.replace(lora, strength=s) for lora, s in pairs])

    def add(self, lora, strength: float = 1.0) -> None:
        """Apply one more LoRA (a path, or a ``LoraSet`` entry) on top of the others."""
        (spec,) = LoraSet([(lora, strength)]).specs
        self._change([*self._loras, self._open(spec)])

    def replace(self, loras: LoraSet | Iterable) -> None:
        """Switch to ``loras`` (all of them, in place of those applied) in one pass: each
        weight whose patches change is recomputed once from its original. Every LoRA is opened
        (and, with ``strict``, checked) before any weight changes."""
        self._change([self._open(spec) for spec in _lora_set(loras).specs])

    def remove_lora(self, which: int | str | os.PathLike) -> None:
        """Take one LoRA off (by position, or by the path it was given as)."""
        index = self._index(which)
        self._change([lora for i, lora in enumerate(self._loras) if i != index])

    def remove(self) -> None:
        """Restore every touched weight's original bytes and forget every LoRA."""
        self._change([])

    def use_checkpoint(self, path: str | os.PathLike) -> None:
        """Re-read originals from ``path`` from now on (the checkpoint given to ``apply()``
        changed or moved): it must hold each one's bytes as read then (CRC-32C checked)."""
        self._originals.use_checkpoint(path)

    # ---- internals ----
    def _index(self, which) -> int:
        labels = self.loras
        if isinstance(which, bool) or not isinstance(which, (int, str, os.PathLike)):
            raise ArgumentTypeError(
                f"remove_lora takes a position or a path, got {type(which).__name__}"
            )
        if isinstance(which, int):
            if not -len(labels) <= which < len(labels):
                raise NotApplied(f"no LoRA at position {which}: the handle holds {len(labels)}")
            return which % len(labels)
        path = os.path.abspath(os.path.expanduser(os.fspath(which)))
        if path not in labels:
            held = ", ".join(labels) or "none"
            raise NotApplied(f"{path} is not applied by this handle (it holds: {held})")
        return labels.index(path)

    def _open(self, spec) -> LoraInput:
        """Open one LoRA; with ``strict``, one that would leave keys out (or needs an
        assumption) is refused. Nothing is patched here."""
        shapes = {key: info.shape for key, info in self._infos.items()}
        lora = open_lora(spec, shapes, None, self.allow_nonfinite)
        if self.strict:
            (left,) = collect_patches(self._infos, [lora])[1]
            if left:
                raise refusal(lora, left)
            if lora.warnings:
                raise UsageError(lora.warnings[0], path=lora.label)
        return lora

    def _plan(self, loras: list[LoraInput]):
        """Per weight (a tied one under its first name) the patches of every name of it, in
        LoRA order; the names patched; what each LoRA leaves out."""
        by_name, unmatched = collect_patches(self._infos, loras)
        patches: dict[str, list[PatchRef]] = {}
        for name in sorted(by_name):
            patches.setdefault(self._weight[name], []).extend(by_name[name])
        for refs in patches.values():
            refs.sort(key=lambda p: p.lora)  # stable: a LoRA's names in name order
        return patches, sorted(by_name), unmatched

    def _change(self, loras: list[LoraInput]) -> None:
        """Make ``loras`` what is applied: every weight whose patches change is rewritten,
        all or nothing."""
        patches, touched, unmatched = self._plan(loras)
        old = self._patches
        changed = sorted(k for k in set(old) | set(patches) if _sums(old, k) != _sums(patches, k))
        new = [k for k in changed if k not in old]
        self._claim(new)
        self._originals.check(self._storage[k] for k in changed if k in old)
        written: list[str] = []
        try:
            for key in new:
                self._originals.remember(self._storage[key], key, self.tensors[key])
            for key in changed:
                self._write(key, patches.get(key), checked=True)
                written.append(key)
        except BaseException as failure:
            self._undo(written, old, failure)
            for key in new:
                self._originals.forget(self._storage[key])
            raise
        for key in changed:
            if key not in patches:
                self._originals.forget(self._storage[key])
                _LIVE.pop(self._storage[key], None)
            elif key not in old:
                _LIVE[self._storage[key]] = weakref.ref(self)
        self._loras, self._touched, self._patches, self.unmatched = (
            loras,
            touched,
            patches,
            unmatched,
        )

    def _claim(self, keys: list[str]) -> None:
        for key in keys:
            ref = _LIVE.get(self._storage[key])
            holder = ref() if ref is not None else None
            if holder is not None and holder is not self:
                raise AlreadyPatched(
                    "is patched by another live apply() handle, which alone can restore it",
                    key=key,
                    hint="change that handle (set_strengths, add, remove_lora) or remove() it "
                    "first",
                )

    def _write(self, key: str, patches: list[PatchRef] | None, checked: bool) -> None:
        """``key``'s weight as its original plus ``patches`` (its original alone for none);
        with ``checked``, refused before it is written if NaN or Inf would be."""
        weight = self.tensors[key]
        original = self._originals.load(self._storage[key], weight.device, weight.dtype)
        if not patches:
            with torch.no_grad():
                weight.copy_(original)
            return
        out = thread_buffer(tuple(weight.shape), torch.float32, weight.device, "apply")
        allow = self.allow_nonfinite or not checked
        merged = merge_weight(original, load_deltas(patches, weight.device, allow), out=out)
        if not allow and not casts_finite(merged, weight.dtype) and is_finite(original):
            check_written(
                merged.to(weight.dtype),
                key=key,
                made_from=f"the model's weight + {describe(patches)}",
                fix="lower the strength",
                dtype=weight.dtype,
            )
        with torch.no_grad():
            weight.copy_(merged)  # the same rounding as merge's cast

    def _undo(self, written: list[str], old: dict, failure: BaseException) -> None:
        """Put back the weights this change wrote before it failed: recomputed as they were
        (the same bytes: the arithmetic is deterministic)."""
        failed = []
        for key in reversed(written):
            try:
                self._write(key, old.get(key), checked=False)
            except BaseException:  # keep going: every weight that can be restored is
                failed.append(key)
        if failed:
            raise RestoreFailed(
                f"a change failed ({failure}) and {len(failed)} weight(s) could not be put back "
                f"as they were, e.g. '{failed[0]}'",
                hint="reload the model",
            ) from failure


def _lora_set(loras) -> LoraSet:
    """``loras`` as a ``LoraSet``: one already, one path, or a list of LoRAs."""
    if isinstance(loras, LoraSet):
        return loras
    if isinstance(loras, (str, os.PathLike)):
        return LoraSet([loras])
    if not isinstance(loras, Iterable):
        raise ArgumentTypeError(
            f"takes a LoraSet, a list of LoRAs or one path, got {type(loras).__name__}"
        )
    return LoraSet(loras)


def _sums(patches: dict[str, list[PatchRef]], key: str) -> list[tuple]:
    """What a weight's patches compute, whatever the LoRAs' positions."""
    return [(p.kind, p.factor, p.up, p.down, p.diff) for p in patches.get(key, ())]


def _tensors(target) -> dict[str, torch.Tensor]:
    """A module's state-dict tensors (its non-tensor extra state left out), or a state
    dict's, which must all be tensors."""
    if isinstance(target, torch.nn.Module):
        state = target.state_dict(keep_vars=True)
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if isinstance(target, Mapping):
        for key, value in target.items():
            if not isinstance(value, torch.Tensor):
                raise ArgumentTypeError(
                    f"state dict entry {key!r} is a {type(value).__name__}, not a tensor",
                    hint="pass a dict of tensors, or the module itself",
                )
        return dict(target)
    raise ArgumentTypeError(
        f"apply() takes a torch.nn.Module or a state dict, got {type(target).__name__}"
    )


def _info(key: str, tensor: torch.Tensor) -> TensorInfo | None:
    code = stf.CODE_BY_DTYPE.get(tensor.dtype)
    return TensorInfo(key, "<model>", code, tuple(tensor.shape)) if code else None
