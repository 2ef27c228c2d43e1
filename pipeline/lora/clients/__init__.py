"""Which client applies what of a LoRA file: the loaders' own rules, written down as facts from
their code (file and function cited in each module) and, for diffusers and peft, checked
against the installed clients by the tests. ``inspect`` shows them; the writers name what a
style's clients cannot apply.

A file is judged by its keys alone: ``LoraFile`` groups them into entries (one per patched
tensor: a low-rank pair with its alpha, or a diff) as loraforge reads them."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from ..layouts import WAN, detect_layout
from ..modules import LoraModule, group_lora

_KOHYA_WAN = re.compile(r"^lora_unet_blocks_\d+_(self|cross)_attn_[qkvo]\.")


def judges(keys) -> bool:
    """Whether the client rules (written for Wan's loaders) judge a LoRA with these keys: its
    module names are Wan's, in either layout or as kohya names."""
    keys = list(keys)
    found = detect_layout(keys)
    return (found is not None and found[0] is WAN) or any(_KOHYA_WAN.match(k) for k in keys)


@dataclass(frozen=True)
class LoraFile:
    keys: tuple[str, ...]
    entries: tuple[LoraModule, ...]
    peft_config: bool = False  # an adapter_config.json beside the weights (a PEFT directory)

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], peft_config: bool = False):
        """The entries of a file whose keys have these shapes (alpha values do not matter to
        the rules: only which keys exist)."""
        alphas = {key: 1.0 for key in shapes if key.endswith(".alpha")}
        grouped = group_lora(shapes, alphas=alphas, source="<rules>")
        return cls(tuple(shapes), tuple(grouped.modules), peft_config)


def label(entry: LoraModule) -> str:
    """An entry by the key that names it: the diff's, or the pair's module."""
    return entry.diff_key or entry.module


@dataclass(frozen=True)
class Loading:
    client: str
    refused: str | None  # why the client refuses the whole file (it raises); None: it loads
    applied: tuple[str, ...] = ()  # entries (``label``) it applies
    not_applied: dict[str, str] = field(default_factory=dict)  # entry → why not

    @property
    def total(self) -> int:
        return len(self.applied) + len(self.not_applied)

    def summary(self) -> str:
        """One line: ``comfyui: 66/69 applied; 3 not: ComfyUI reads no .diff_m (...)``."""
        if self.refused:
            return f"{self.client}: refuses the file: {self.refused}"
        line = f"{self.client}: {len(self.applied)}/{self.total} applied"
        if self.not_applied:
            reasons = Counter(self.not_applied.values())
            line += "; not: " + "; ".join(f"{n} × {why}" for why, n in reasons.most_common())
        return line

    def to_dict(self) -> dict:
        return {
            "loads": self.refused is None,
            "refused": self.refused,
            "applied": len(self.applied),
            "entries": self.total,
            "not_applied": dict(sorted(self.not_applied.items())),
        }


def judged(client: str, entries, verdict) -> Loading:
    """``verdict(entry)`` → None (applied) or why not, for every entry."""
    applied, not_applied = [], {}
    for entry in entries:
        why = verdict(entry)
        if why is None:
            applied.append(label(entry))
        else:
            not_applied[label(entry)] = why
    return Loading(client, None, tuple(applied), not_applied)


def client_loadings(file: LoraFile) -> dict[str, Loading]:
    """Every client's loading of ``file``, by client name."""
    from . import comfyui, diffusers, lightx2v, peft

    return {rule.CLIENT: rule.loading(file) for rule in (lightx2v, comfyui, diffusers, peft)}
