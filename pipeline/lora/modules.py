"""A LoRA read by its own module names, without a base checkpoint: for commands that look at a
LoRA alone (``inspect``: ``group_lora``; ``resize``, ``convert``: ``own_targets``). Same
grouping (``keys.group_keys``) and scale rules as ``keys.map_lora``, which resolves those
modules against a base instead.

Pure: works on key names, shapes and the ``.alpha`` values only."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .adapter_config import PeftConfig
from .keys import (
    DIFF_LEAF,
    KOHYA_PREFIXES,
    Shapes,
    Unmatched,
    check_pair,
    first_in_file_order,
    group_keys,
    lowrank_scale,
    parse_key,
    read_keys,
    strip_forms,
    unpaired,
)


@dataclass(frozen=True)
class LoraModule:
    module: str  # as the LoRA spells it, prefix kept
    leaf: str  # the base leaf it patches: weight (low-rank, .diff), bias (.diff_b), modulation
    naming: str  # keys.py's naming of its keys (lora_up, peft, diffusers, ..., diff, diff_b)
    kind: str  # "lowrank" | "diff"
    up_key: str | None
    down_key: str | None
    diff_key: str | None
    alpha_key: str | None  # the file's <module>.alpha
    alpha: float | None  # its value, else the PEFT config's lora_alpha (None with rsLoRA)
    rank: int | None
    scale: float  # multiplies up@down: alpha / rank, else the PEFT config's, else 1.0
    shape: tuple[int, ...]  # the delta's: (up rows, *down's other dims) or the diff's


@dataclass(frozen=True)
class LoraModules:
    modules: list[LoraModule]  # sorted by (module, leaf)
    unmatched: list[Unmatched]  # keys in no module, and why; sorted by key


def group_lora(
    lora_shapes: Shapes,
    *,
    alphas: dict[str, float] | None = None,
    peft_config: PeftConfig | None = None,
    source: str = "<lora>",
) -> LoraModules:
    """Every module of the LoRA with its keys, rank and scale; every key in none, with why.
    When one module has two namings, the first in file order is kept (as ``map_lora``)."""
    alphas = alphas or {}
    keys = read_keys(lora_shapes, alphas, source)

    def plan(module: str, naming: str, roles: dict[str, str]):
        alpha_key = keys.alpha_keys.get(module)
        alpha = alphas[alpha_key] if alpha_key else None
        return _module(module, naming, roles, lora_shapes, alpha_key, alpha, peft_config)

    modules, unmatched = first_in_file_order(
        keys,
        plan,
        slot=lambda found: (found.module, found.leaf),
        duplicate=lambda first, _: f"duplicate: {first.up_key or first.diff_key} has that module",
    )
    return LoraModules(modules=modules, unmatched=unmatched)


def _module(module, naming, roles, shapes, alpha_key, alpha, peft_config):
    """``(LoraModule, "")`` or ``(None, why not)``."""
    if naming in DIFF_LEAF:
        key = roles["diff"]
        found = LoraModule(
            module, DIFF_LEAF[naming], naming, "diff", None, None, key, None, None, None, 1.0,
            tuple(shapes[key]),
        )  # fmt: skip
        return found, ""
    if reason := unpaired(roles):
        return None, reason
    up, down = tuple(shapes[roles["up"]]), tuple(shapes[roles["down"]])
    product = (up[0] if up else 0, math.prod(down[1:]))
    if reason := check_pair(up, down, product):
        return None, reason
    rank = down[0]
    scale, alpha = lowrank_scale(module, rank, alpha, peft_config)
    found = LoraModule(
        module, "weight", naming, "lowrank", roles["up"], roles["down"], None, alpha_key, alpha,
        rank, scale, (up[0], *down[1:]),
    )  # fmt: skip
    return found, ""


def kohya_keys(lora_shapes: Shapes) -> list[str]:
    """The keys of modules with kohya names (``lora_unet_blocks_0_attn_q``), sorted: only the
    model they patch can say which ``_`` is a dot, so ``own_targets`` leaves them out."""
    parsed = ((key, parse_key(key)) for key in lora_shapes)
    return sorted(key for key, p in parsed if p is not None and p[0].startswith(KOHYA_PREFIXES))


def own_targets(lora_shapes: Shapes) -> Shapes:
    """The weights a LoRA patches, named and shaped from its own keys, for reading it without
    a base (``resize``, ``convert``): ``<m>.weight`` of shape (out, *in) for an up/down pair,
    ``<m>.weight`` / ``.bias`` / ``.modulation`` for a diff, ``<m>`` with ``PREFIXES`` stripped,
    so the same module in two namings is one target. Pairs ``group_lora`` refuses (rank
    mismatch, LoCon mid) still name their target, so that ``map_lora`` against these targets
    says why, as it would against a base. Kohya names are left out (``kohya_keys``). The first
    pair in file order wins a target (``map_lora`` then reports the other as a duplicate or a
    shape mismatch)."""
    targets: Shapes = {}
    for (module, naming), roles in group_keys(lora_shapes).groups.items():
        if module.startswith(KOHYA_PREFIXES):
            continue
        name = strip_forms(module)[-1]
        if naming in DIFF_LEAF:
            targets.setdefault(f"{name}.{DIFF_LEAF[naming]}", tuple(lora_shapes[roles["diff"]]))
        elif not unpaired(roles):
            up, down = lora_shapes[roles["up"]], lora_shapes[roles["down"]]
            if len(up) >= 2 and len(down) >= 2:
                targets.setdefault(f"{name}.weight", (up[0], *down[1:]))
    return targets
