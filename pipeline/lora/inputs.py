"""Opening the LoRAs of a merge: find the weights (a file, a shard directory, or a PEFT adapter
directory), read their ``.alpha`` values and the PEFT scaling, and map their keys onto the base.

Reads headers, the adapter config and the ``.alpha`` scalars; never a factor."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from ..errors import (
    CheckpointFormatError,
    CheckpointNotFound,
    LoraMismatch,
    NonFiniteTensor,
    UsageError,
)
from ..io.reader import CheckpointIndex, index_checkpoint, load_tensor
from .adapter_config import METADATA_KEY, PeftConfig, header_config, load_peft_config
from .config import LoraSpec
from .keys import LoraMapping, Unmatched, map_lora
from .numbers import RANGE, in_range

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = (("adapter_model.safetensors", "safetensors"), ("adapter_model.bin", "pytorch"))


@dataclass(frozen=True)
class LoraInput:
    label: str  # the path as the user gave it (resolved)
    file: str  # the weights read: a file or a shard directory
    strength: float
    index: CheckpointIndex
    mapping: LoraMapping
    peft: dict | None  # the scaling part of a PEFT config (or a config entry's alpha)
    config: str | None = None  # the adapter_config.json read, if any
    warnings: tuple[str, ...] = ()  # assumptions made about it (``--strict`` refuses them)


def _peft_without_config(path: str, weights: str, config: str | None, alphas: dict) -> str | None:
    """A PEFT adapter's weights with no adapter_config.json and no ``.alpha`` keys: its scale
    lora_alpha / r is unknown, so 1 is assumed. Say so."""
    names = {name for name, _fmt in PEFT_WEIGHTS}
    holds = os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)
    if config or alphas or not (holds or os.path.basename(weights) in names):
        return None
    return (
        f"PEFT adapter without {PEFT_CONFIG}: its lora_alpha and r are unknown, so it is "
        "merged at scale 1 (as if alpha = rank)"
    )


def find_weights(path: str, lora_type: str | None) -> tuple[str, str | None, str | None]:
    """``(weights path, format or None to guess, adapter_config.json or None)``."""
    if not os.path.exists(path):
        raise CheckpointNotFound("LoRA not found", path=path, hint="check --lora-model")
    if os.path.isdir(path):
        config = os.path.join(path, PEFT_CONFIG)
        if not os.path.isfile(config):
            return path, lora_type, None  # a shard directory
        for name, fmt in PEFT_WEIGHTS:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name), fmt, config
        raise CheckpointNotFound(
            "PEFT adapter directory holds no adapter_model.safetensors or adapter_model.bin",
            path=path,
        )
    beside = os.path.join(os.path.dirname(path), PEFT_CONFIG)
    return path, lora_type, beside if os.path.isfile(beside) else None


def _alpha(index: CheckpointIndex, key: str, allow_nonfinite: bool) -> float:
    info = index.tensors[key]
    if info.numel != 1 or not (info.is_float or info.dtype in ("I64", "I32", "I16", "I8")):
        raise CheckpointFormatError(
            f"an alpha must be one number, found {info.dtype}{list(info.shape)}",
            path=info.file,
            key=key,
        )
    value = float(load_tensor(info, torch.float64).reshape(-1)[0])
    if not math.isfinite(value) and not allow_nonfinite:
        raise NonFiniteTensor(
            f"alpha is {value}",
            path=info.file,
            key=key,
            hint="fix the LoRA; merge and resize read it anyway with --allow-nonfinite",
        )
    if math.isfinite(value) and not in_range(value):
        raise CheckpointFormatError(f"alpha {value:g} is outside {RANGE}", path=info.file, key=key)
    return value


@dataclass(frozen=True)
class OpenedLora:
    """A LoRA's weights found and indexed, with what scales them; no base involved."""

    file: str  # the weights read: a file or a shard directory
    index: CheckpointIndex
    peft: PeftConfig | None  # the adapter config's scaling (or a config entry's alpha)
    config: str | None  # the adapter_config.json read, if any
    alphas: dict[str, float]  # the values of its ``.alpha`` keys
    warnings: tuple[str, ...] = ()  # assumptions made about it


def read_lora(
    path: str,
    lora_type: str | None = None,
    alpha: float | None = None,
    allow_nonfinite: bool = False,
) -> OpenedLora:
    """Find and index the LoRA at ``path``; ``alpha``: a LightX2V config entry's (see
    config.py), the scale alpha / rank of modules without an ``.alpha`` key."""
    file, fmt, config = find_weights(path, lora_type)
    index = index_checkpoint(file, fmt)
    # a PEFT adapter's config, else the one a diffusers file keeps in its header
    peft: PeftConfig | None = load_peft_config(config) if config else header_config(index)
    if alpha is not None:
        if peft is not None:
            owner = "a PEFT adapter" if config else f"a diffusers LoRA (header {METADATA_KEY})"
            raise UsageError(
                f"a config 'alpha' for {owner}, which has its own lora_alpha",
                path=path,
                hint="drop 'alpha' from this lora_configs entry",
            )
        peft = PeftConfig(r=1, lora_alpha=alpha)  # scale = alpha / the tensors' rank
    alphas = {
        key: _alpha(index, key, allow_nonfinite) for key in index.tensors if key.endswith(".alpha")
    }
    unscaled = None if alpha is not None else _peft_without_config(path, file, config, alphas)
    return OpenedLora(file, index, peft, config, alphas, (unscaled,) if unscaled else ())


# Why keys patch nothing, the most telling first, with what to do: an ``.alpha`` left over
# or a key with no LoRA name only follows from another key's problem.
CAUSES = (
    ("shape mismatch", "is this LoRA for another model?"),
    ("rank mismatch", "its up and down factors disagree; re-save the LoRA"),
    ("a rank-0 pair", "drop the empty module from the LoRA"),
    ("not a low-rank pair", "re-save the LoRA"),
    ("up without down", "is a shard of the LoRA missing?"),
    ("down without up", "is a shard of the LoRA missing?"),
    ("has a lora_mid", "LoCon Tucker modules are not supported"),
    ("ambiguous", "the base has several tensors this name could mean"),
    ("targets no base tensor", "is this LoRA for another model?"),
    ("duplicate", "the LoRA names this module twice; keep one naming"),
)


def telling(unmatched: list[Unmatched]) -> tuple[Unmatched | None, str | None]:
    """The key whose reason best explains why a LoRA patches nothing, and the hint for it."""
    order = {cause: (rank, hint) for rank, (cause, hint) in enumerate(CAUSES)}
    last = (len(CAUSES), None)

    def cause(u: Unmatched) -> tuple[int, str | None]:
        return next((v for c, v in order.items() if u.reason.startswith(c)), last)

    if not unmatched:
        return None, None
    first = min(unmatched, key=lambda u: (cause(u)[0], u.reason.startswith("alpha"), u.lora_key))
    return first, cause(first)[1]


def open_lora(
    spec: LoraSpec,
    base_shapes: dict[str, tuple[int, ...]],
    lora_type: str | None = None,
    allow_nonfinite: bool = False,
    against: str = "the base",
) -> LoraInput:
    """Open the LoRA of ``spec`` and map it onto ``base_shapes`` (``against`` names them in
    the refusal of a LoRA none of whose keys patch them)."""
    opened = read_lora(spec.path, lora_type, spec.alpha, allow_nonfinite)
    file, index, peft = opened.file, opened.index, opened.peft
    mapping = map_lora(
        {key: info.shape for key, info in index.tensors.items()},
        base_shapes,
        alphas=opened.alphas,
        peft_config=peft,
        source=file,
    )
    if not mapping.patches:
        first, hint = telling(mapping.unmatched)
        example = f", e.g. '{first.lora_key}': {first.reason}" if first else ""
        raise LoraMismatch(
            f"none of its {len(index.tensors)} keys patches {against}{example}",
            path=file,
            hint=hint,
        )
    return LoraInput(
        label=spec.path,
        file=file,
        strength=spec.strength,
        index=index,
        mapping=mapping,
        peft=dataclasses.asdict(peft) if peft else None,
        config=opened.config,
        warnings=opened.warnings,
    )
