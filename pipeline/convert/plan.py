"""Conversion planning from headers (and the ``.alpha`` scalars) alone: which LoRA tensors make
each output weight, under which names, with which alpha; every key left out and why.

Module names come from the base when ``--base`` is given (the keys ``merge`` would patch, so a
kohya name maps back through the base's own module paths); without it, from the LoRA's own
keys with their known prefixes stripped, which kohya names cannot do (``_`` is ambiguous).
Alpha is carried, not recomputed: scale = alpha / rank stays the same float, so merging the
converted LoRA gives the bytes merging the original gives."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..export.writer import LoraWeight
from ..io.layout import OutputEntry
from ..io.reader import TensorInfo
from ..lora.inputs import OpenedLora
from ..lora.keys import LoraPatch, Unmatched, map_lora
from ..lora.modules import kohya_keys, own_targets
from ..lora.styles import KeyStyle, diff_pair


@dataclass(frozen=True)
class ConvertWeight:
    key: str  # the checkpoint tensor it patches
    kind: str  # "lowrank" | "diff"
    sources: dict[str, TensorInfo]  # role (up, down, alpha, diff) -> LoRA tensor read
    names: dict[str, str]  # role -> output key
    rank: int | None = None
    alpha: float | None = None  # scale = alpha / rank
    identity: str | None = None  # a diff written as an exact pair: the identity factor's role

    @property
    def name(self) -> str:
        """Readable, stable task key."""
        return f"{self.kind}-{self.key}"

    @property
    def outputs(self) -> dict[str, str]:
        """Role → output key, as the other commands' tasks name them."""
        return self.names

    def entries(self) -> list[OutputEntry]:
        out = []
        for role, name in self.names.items():
            info = self.sources.get(role)
            if info is not None:
                out.append(OutputEntry(name, info.dtype, info.shape))
            elif role == self.identity:
                diff = next(iter(self.sources.values()))
                out.append(OutputEntry(name, diff.dtype, (self.rank, self.rank)))
            else:  # an alpha the source kept elsewhere (a config) or did not have
                out.append(OutputEntry(name, self.alpha_code, ()))
        return out

    @property
    def alpha_code(self) -> str:
        """The dtype of a new alpha tensor: fp32 (exact for any rank), or fp64 where fp32
        would round the value (an rsLoRA scale times the rank)."""
        exact = torch.tensor(self.alpha, dtype=torch.float32).item() == self.alpha
        return "F32" if exact else "F64"

    def written(self) -> LoraWeight:
        return LoraWeight(self.key, tuple(self.names.values()), self.rank, self.alpha)


@dataclass(frozen=True)
class ConvertPlan:
    style: KeyStyle
    weights: list[ConvertWeight]  # sorted by key
    left_out: list[Unmatched]  # LoRA keys not written, and why; sorted by key

    @property
    def entries(self) -> list[OutputEntry]:
        return sorted((e for w in self.weights for e in w.entries()), key=lambda e: e.name)


def own_base(opened: OpenedLora) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys and shapes the LoRA's own names imply (no ``--base``); kohya names
    are refused, since only the base can say which ``_`` is a dot."""
    shapes = {key: info.shape for key, info in opened.index.tensors.items()}
    if kohya := kohya_keys(shapes):
        raise UsageError(
            f"kohya names ('{kohya[0]}') map back to module names only through the model "
            "they patch",
            path=opened.file,
            hint="pass --base MODEL",
        )
    return own_targets(shapes)


def _weight(patch: LoraPatch, opened: OpenedLora, style: KeyStyle) -> ConvertWeight | Unmatched:
    tensors = opened.index.tensors
    if patch.kind == "diff":
        diff = tensors[patch.diff_key]
        names = style.diff_outputs(patch.base_key, diff.shape, keep_diff=True)
        if names is None:
            return Unmatched(patch.diff_key, style.cannot_hold(patch.base_key))
        if "diff" in names:
            return ConvertWeight(patch.base_key, "diff", {"diff": diff}, names)
        pair = diff_pair(diff.shape)  # a style without diffs: the exact pair
        return ConvertWeight(
            patch.base_key, "diff", {pair.holder: diff}, names, pair.rank, float(pair.rank),
            pair.identity,
        )  # fmt: skip
    sources = {"up": tensors[patch.up_key], "down": tensors[patch.down_key]}
    if patch.alpha_key is not None:
        sources["alpha"] = tensors[patch.alpha_key]
    if patch.alpha is not None:
        alpha = patch.alpha
    else:  # no alpha anywhere: scale 1 (alpha = rank); rsLoRA: the scale times the rank
        alpha = float(patch.rank) if patch.scale == 1.0 else patch.scale * patch.rank
    names = style.lowrank_names(patch.base_key, alpha_is_rank=alpha == patch.rank)
    return ConvertWeight(patch.base_key, "lowrank", sources, names, patch.rank, alpha)


def plan_convert(
    opened: OpenedLora, style: KeyStyle, base_shapes: dict[str, tuple[int, ...]] | None
) -> ConvertPlan:
    base = own_base(opened) if base_shapes is None else base_shapes
    mapping = map_lora(
        {key: info.shape for key, info in opened.index.tensors.items()},
        base,
        alphas=opened.alphas,
        peft_config=opened.peft,
        source=opened.file,
    )
    style = style.for_model(base)
    weights, left_out = [], list(mapping.unmatched)
    for patch in mapping.patches:
        planned = _weight(patch, opened, style)
        (left_out if isinstance(planned, Unmatched) else weights).append(planned)
    return ConvertPlan(style, weights, sorted(left_out, key=lambda u: u.lora_key))
