"""The LoRAs on a running model: one ``loraforge.apply`` handle per transformer, switched as a
whole set per run or request, every weight recomputed from its original (re-read from the
checkpoint the model was loaded from where its bytes match: no second copy of the model).

Which transformer a LoRA patches: a Wan 2.1 model has one. For Wan 2.2 MoE, an entry named
``high_noise_model`` patches ``transformer``, ``low_noise_model`` ``transformer_2`` (LightX2V's
``lora_configs`` names, as its Wan2.2 configs always give them), and an entry without a name
patches both (LightX2V would patch neither: its MoE runners keep only named entries)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

import torch

from ..errors import CheckpointNotFound, LoraMismatch, UsageError
from ..io.reader import CheckpointIndex
from ..lora.config import LoraSpec
from ..lora.inputs import open_lora
from ..lora.patches import collect_patches
from .models import EXPERTS, ModelClass

Assigned = dict[str, tuple[LoraSpec, ...]]  # transformer -> its LoRAs, in order
Named = Sequence[tuple[str | None, LoraSpec]]  # (entry name or None, LoRA)


def assign(model: ModelClass, loras: Named, where: str | None, field: str) -> Assigned:
    """Each transformer's LoRAs; a name that ``model`` does not have is refused in one line
    (``field``: what the user wrote the entries in, for the message)."""
    assigned: dict[str, list[LoraSpec]] = {name: [] for name in model.transformers}
    for i, (name, spec) in enumerate(loras):
        if name is None:
            targets = model.transformers
        elif not model.moe:
            raise UsageError(
                f"{field}[{i}] is named {name!r}, a Wan 2.2 expert; --model_cls {model.name} "
                "has one transformer: leave 'name' out",
                path=where,
            )
        elif name not in EXPERTS:
            raise UsageError(
                f"{field}[{i}]: unknown name {name!r}; valid: {', '.join(EXPERTS)} (or no "
                "name: both transformers)",
                path=where,
            )
        else:
            targets = (EXPERTS[name],)
        for target in targets:
            assigned[target].append(spec)
    return {name: tuple(specs) for name, specs in assigned.items()}


def check_files(assigned: Assigned, where: str | None, field: str) -> None:
    """Every LoRA exists (``where``: the config naming them, None for ``field`` on the command
    line)."""
    hint = (
        "relative paths are read from the config's directory, then from the working directory"
        if where
        else f"check {field}"
    )
    for specs in assigned.values():
        for spec in specs:
            if not os.path.exists(spec.path):
                raise CheckpointNotFound(f"LoRA not found: {spec.path}", path=where, hint=hint)


class ModelLoras:
    """The handles of a loaded pipeline's transformers."""

    def __init__(self, pipe, model: ModelClass, checkpoints: dict):
        import loraforge

        self.pipe, self.model = pipe, model
        self.handles = {
            name: loraforge.apply(getattr(pipe, name), [], checkpoint=checkpoints.get(name))
            for name in model.transformers
        }
        self.current: Assigned = {name: () for name in model.transformers}

    def check(self, assigned: Assigned, strict: bool = False) -> None:
        """Refuse, before any weight changes, a LoRA for another model: one that patches
        nothing (refused as it is opened), or (``strict``: a server's requests) one with any key
        that patches nothing. Keys left out otherwise are reported by ``summaries``."""
        for name, specs in assigned.items():
            summaries = self.handles[name].check(specs)
            if strict:
                _refuse_left_out(summaries, name)

    def switch(self, assigned: Assigned) -> bool:
        """Apply ``assigned`` in place of the current LoRAs; True when a weight was recomputed.
        Only the transformers whose set changed are touched: their LoRAs are checked first
        (``check``), so a refused one leaves every weight as it was. After a failure once
        weights change, every transformer is back at its original bytes."""
        changed = {name: specs for name, specs in assigned.items() if specs != self.current[name]}
        self.check(changed)
        try:
            for name, specs in changed.items():
                self.current[name] = ()  # unknown until replace returns
                self.handles[name].replace(list(specs))
                self.current[name] = specs
        except BaseException:
            self.remove()
            raise
        return bool(changed)

    def remove(self) -> None:
        for name, handle in self.handles.items():
            handle.remove()
            self.current[name] = ()

    def summaries(self) -> list[dict]:
        """Each applied LoRA per transformer: path, strength, weights patched, keys left out."""
        return [
            {**summary, "model": name}
            for name, handle in self.handles.items()
            for summary in handle.summaries()
        ]

    @property
    def held_bytes(self) -> int:
        return sum(handle.held_bytes for handle in self.handles.values())

    def applied(self) -> list[dict]:
        """The current LoRAs as a request or report names them."""
        return [
            {"model": name, "path": spec.path, "strength": spec.strength}
            for name, specs in self.current.items()
            for spec in specs
        ]


def _refuse_left_out(summaries: list[dict], name: str) -> None:
    for summary in summaries:
        if left := summary["unmatched"]:
            key, why = next(iter(left.items()))
            raise LoraMismatch(
                f"{len(left)} of its {summary['keys']} keys patch nothing in {name} "
                f"(e.g. '{key}': {why})",
                path=summary["path"],
                hint="is it a LoRA for this model?",
            )


def check_headers(checkpoints: dict[str, CheckpointIndex | None], assigned: Assigned) -> None:
    """Before anything is loaded: refuse a LoRA that patches nothing in its transformer, from
    the transformer checkpoint's headers (a transformer in another format is checked once
    loaded), as ``loraforge.apply`` would refuse it."""
    for name, index in checkpoints.items():
        if index is None:
            continue
        shapes = {key: info.shape for key, info in index.tensors.items()}
        opened = [open_lora(spec, shapes) for spec in assigned.get(name, ())]
        collect_patches(index.tensors, opened)  # refuses a strength × scale past float32's range


def weights_digest(modules: Iterable[tuple[str, torch.nn.Module]]) -> str:
    """sha256 over every tensor of the modules (name, dtype, shape and bytes, in name order):
    equal digests, equal bytes."""
    digest = hashlib.sha256()
    for prefix, module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            data = tensor.detach().contiguous().cpu()
            digest.update(f"{prefix}.{key}:{data.dtype}:{tuple(data.shape)}\n".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
