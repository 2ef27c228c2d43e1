"""Map a LoRA's keys onto the keys of a base checkpoint (for ``loraforge merge``).

Pure: works on key names and shapes only. Namings recognised per key, for a module ``<m>`` (one
file may mix them):

* ``<m>.lora_up.weight`` / ``<m>.lora_down.weight`` (kohya, LightX2V). A ``<m>.lora_mid.weight``
  (LoCon Tucker) is reported unmatched, and so is its pair: up@down alone is not that delta.
* ``<m>_lora.up.weight`` / ``<m>_lora.down.weight``
* ``<m>.lora_B.weight`` / ``<m>.lora_A.weight`` (PEFT); ``<m>.lora_B`` / ``<m>.lora_A`` (Mochi);
  ``<m>.lora_B.default.weight`` / ``<m>.lora_A.default.weight`` (PEFT unmerged, Qwen)
* ``<m>.lora.up.weight`` / ``<m>.lora.down.weight``
* ``<m>.lora_linear_layer.up.weight`` / ``<m>.lora_linear_layer.down.weight`` (diffusers)
* ``<m>.alpha``: scale = alpha / rank; without it a PEFT config's scale, else 1.0
* ``<m>.diff`` / ``<m>.diff_b`` / ``<m>.diff_m``: full deltas of ``<m>.weight`` / ``.bias`` /
  ``.modulation``

``<m>`` resolves against the base exactly, then with ``PREFIXES`` stripped from the LoRA's name
or from the base's, then as a kohya name (``lora_unet_blocks_0_self_attn_q``) looked up among the
base's own module paths written with ``_`` for ``.``.

``group_keys`` is the one reading of those names; ``modules.py`` builds the base-less views of a
LoRA (``group_lora``, ``own_targets``) on it and on the scale rule here (``lowrank_scale``). A
PEFT adapter's scaling comes from ``adapter_config.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property

from ..errors import CheckpointFormatError
from .adapter_config import PeftConfig
from .layouts import LAYOUT_NAMES, renamed

PREFIXES = ("diffusion_model.", "model.", "unet.", "transformer.", "base_model.model.")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")

# naming -> (up suffix, down suffix); a key takes the longest suffix it ends with
_PAIRS = {
    "lora_up": (".lora_up.weight", ".lora_down.weight"),
    "_lora": ("_lora.up.weight", "_lora.down.weight"),
    "peft": (".lora_B.weight", ".lora_A.weight"),
    "mochi": (".lora_B", ".lora_A"),
    "peft_default": (".lora_B.default.weight", ".lora_A.default.weight"),
    "lora.up": (".lora.up.weight", ".lora.down.weight"),
    "diffusers": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
}
DIFF_LEAF = {"diff": "weight", "diff_b": "bias", "diff_m": "modulation"}
_SUFFIXES: dict[str, tuple[str, str]] = {  # suffix -> (naming, role)
    **{up: (naming, "up") for naming, (up, _) in _PAIRS.items()},
    **{down: (naming, "down") for naming, (_, down) in _PAIRS.items()},
    **{f".{naming}": (naming, "diff") for naming in DIFF_LEAF},
    ".lora_mid.weight": ("lora_up", "mid"),
    ".alpha": ("alpha", "alpha"),
}
_BY_LENGTH = sorted(_SUFFIXES, key=len, reverse=True)
Shapes = dict[str, tuple[int, ...]]
_HINT = (
    "expected names ending in .lora_up/.lora_down.weight, .lora_A/.lora_B(.weight), "
    ".lora_linear_layer.up/.down.weight, .alpha or .diff; is this a full checkpoint?"
)


@dataclass(frozen=True)
class LoraPatch:
    base_key: str
    kind: str  # "lowrank" | "diff"
    up_key: str | None
    down_key: str | None
    diff_key: str | None
    scale: float  # multiplies up@down (or diff); strength is applied elsewhere
    rank: int | None
    alpha: float | None = None  # low rank: scale = alpha / rank (None: 1, or rsLoRA's)
    alpha_key: str | None = None  # the LoRA's own <module>.alpha key, if it has one


@dataclass(frozen=True)
class Unmatched:
    lora_key: str
    reason: str


@dataclass(frozen=True)
class LoraMapping:
    patches: list[LoraPatch]  # sorted by base_key
    unmatched: list[Unmatched]  # sorted by lora_key


def parse_key(key: str) -> tuple[str, str, str] | None:
    """``key`` -> (module, naming, role), or None when it is no LoRA name."""
    for suffix in _BY_LENGTH:
        if key.endswith(suffix) and len(key) > len(suffix):
            return (key[: -len(suffix)], *_SUFFIXES[suffix])
    return None


def strip_forms(name: str) -> list[str]:
    """``name`` and every form with known prefixes stripped, least stripped first."""
    forms = [name]
    for form in forms:  # grows while iterating: breadth first
        for prefix in PREFIXES:
            rest = form.removeprefix(prefix)
            if rest != form and rest and rest not in forms:
                forms.append(rest)
    return forms


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _one(hits: set[str], what: str) -> tuple[str | None, str]:
    if len(hits) == 1:
        return next(iter(hits)), ""
    return None, f"{what}: matches {', '.join(sorted(hits))}"


class _Resolver:
    """Finds the base key a LoRA's ``<module>.<leaf>`` patches: as written, with wrapper
    prefixes stripped on either side, in the other layout of the base's model family
    (``layouts.py``: a LoRA with Wan's original names patches a diffusers-named base and the
    other way round), or as a kohya name."""

    def __init__(self, base_shapes: Shapes):
        self.base = base_shapes

    @cached_property
    def stripped(self) -> dict[str, set[str]]:
        index: dict[str, set[str]] = {}
        for key in self.base:
            for form in strip_forms(key):
                index.setdefault(form, set()).add(key)
        return index

    @cached_property
    def relaid(self) -> dict[str, set[str]]:
        """Each base key's stripped forms renamed into the other layout of its family."""
        index: dict[str, set[str]] = {}
        for form, keys in self.stripped.items():
            for layout in LAYOUT_NAMES:
                other = renamed(form, layout)
                if other is not None and other != form:
                    index.setdefault(other, set()).update(keys)
        return index

    @cached_property
    def kohya(self) -> dict[tuple[str, str], set[str]]:
        index: dict[tuple[str, str], set[str]] = {}
        for form, keys in (*self.stripped.items(), *self.relaid.items()):
            module, dot, leaf = form.rpartition(".")
            if dot:
                index.setdefault((module.replace(".", "_"), leaf), set()).update(keys)
        return index

    def resolve(self, module: str, leaf: str) -> tuple[str | None, str]:
        """The base key ``<module>.<leaf>`` refers to, or None and why not."""
        forms = strip_forms(module)
        for form in forms:
            if f"{form}.{leaf}" in self.base:
                return f"{form}.{leaf}", ""
        for form in forms:
            if hits := self.stripped.get(f"{form}.{leaf}"):
                return _one(hits, "ambiguous name")
        for form in forms:
            if hits := self.relaid.get(f"{form}.{leaf}"):
                return _one(hits, "ambiguous name")
        for prefix in KOHYA_PREFIXES:
            if module.startswith(prefix):
                if hits := self.kohya.get((module.removeprefix(prefix), leaf)):
                    return _one(hits, "ambiguous kohya name")
        return None, "targets no base tensor"


def check_pair(up: tuple[int, ...], down: tuple[int, ...], base: tuple[int, ...]) -> str:
    """Why up@down cannot patch a base tensor of shape ``base``; "" when it can."""
    if len(up) < 2 or len(down) < 2 or math.prod(up[2:]) != 1:
        return f"not a low-rank pair: up is {_dims(up)} and down is {_dims(down)}"
    if up[1] == 0 or down[0] == 0:
        return f"a rank-0 pair (up is {_dims(up)}, down is {_dims(down)}) holds no change"
    if up[1] != down[0]:
        return f"rank mismatch: up has rank {up[1]} but down has rank {down[0]}"
    product = (up[0], math.prod(down[1:]))
    if len(base) < 2 or product != (base[0], math.prod(base[1:])):
        return f"shape mismatch: up@down is {_dims(product)} but base is {_dims(base)}"
    return ""


def _plan_diff(
    module: str, naming: str, key: str, lora_shapes: Shapes, resolver: _Resolver
) -> tuple[LoraPatch | None, str]:
    target, reason = resolver.resolve(module, DIFF_LEAF[naming])
    if target is None:
        return None, reason
    diff, base = tuple(lora_shapes[key]), tuple(resolver.base[target])
    if diff != base:
        return None, f"shape mismatch: diff is {_dims(diff)} but base is {_dims(base)}"
    return LoraPatch(target, "diff", None, None, key, 1.0, None), ""


def _plan_lowrank(
    module: str,
    roles: dict[str, str],
    lora_shapes: Shapes,
    resolver: _Resolver,
    alpha_key: str | None,
    alpha: float | None,
    peft_config: PeftConfig | None,
) -> tuple[LoraPatch | None, str]:
    if reason := unpaired(roles):
        return None, reason
    target, reason = resolver.resolve(module, "weight")
    if target is None:
        return None, reason
    up, down = tuple(lora_shapes[roles["up"]]), tuple(lora_shapes[roles["down"]])
    if reason := check_pair(up, down, tuple(resolver.base[target])):
        return None, reason
    rank = down[0]
    scale, alpha = lowrank_scale(module, rank, alpha, peft_config)
    up, down = roles["up"], roles["down"]
    return LoraPatch(target, "lowrank", up, down, None, scale, rank, alpha, alpha_key), ""


@dataclass(frozen=True)
class LoraKeys:
    """A LoRA's key names grouped the one way ``map_lora`` and the base-less views
    (``modules.group_lora``, ``modules.own_targets``) all read them."""

    groups: dict[tuple[str, str], dict[str, str]]  # (module, naming) -> role -> key, file order
    alpha_keys: dict[str, str]  # module -> its <module>.alpha key
    not_lora: list[str]  # keys with no LoRA name

    def unused_alphas(self, used: set[str]) -> list[Unmatched]:
        """The ``.alpha`` keys not in ``used`` (no module took them), with why."""
        paired = {module for module, naming in self.groups if naming not in DIFF_LEAF}
        why = ("alpha without up/down", "alpha of an unmatched up/down pair")
        return [
            Unmatched(key, why[module in paired])
            for module, key in self.alpha_keys.items()
            if key not in used
        ]


def group_keys(lora_shapes: Shapes) -> LoraKeys:
    """Every key parsed and grouped by (module, naming); names only, no checks."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    alpha_keys: dict[str, str] = {}
    not_lora: list[str] = []
    for key in lora_shapes:
        parsed = parse_key(key)
        if parsed is None:
            not_lora.append(key)
        elif parsed[2] == "alpha":
            alpha_keys[parsed[0]] = key
        else:
            groups.setdefault(parsed[:2], {})[parsed[2]] = key
    return LoraKeys(groups, alpha_keys, not_lora)


def read_keys(lora_shapes: Shapes, alphas: Mapping[str, float], source: str) -> LoraKeys:
    """``group_keys``, refusing a file with no LoRA key name (a full checkpoint, most likely)
    and an ``.alpha`` key whose value the caller did not read into ``alphas``."""
    keys = group_keys(lora_shapes)
    for key in keys.alpha_keys.values():
        if key not in alphas:
            raise ValueError(f"{source}: the value of '{key}' was not passed in alphas")
    if not keys.groups and not keys.alpha_keys:
        head = ", ".join(list(lora_shapes)[:5]) or "the file holds no tensors"
        raise CheckpointFormatError(f"no LoRA keys recognised ({head})", path=source, hint=_HINT)
    return keys


def unpaired(roles: dict[str, str]) -> str:
    """Why a low-rank module's keys are no pair; "" when both halves are there."""
    if "up" in roles and "down" in roles:
        return ""
    return "up without down" if "up" in roles else "down without up"


def lowrank_scale(
    module: str, rank: int, alpha: float | None, peft_config: PeftConfig | None
) -> tuple[float, float | None]:
    """(scale, alpha) of a low-rank module: its own ``.alpha`` / rank, else the PEFT config's
    (alpha None with rsLoRA, whose scale is no alpha / rank; a config whose rank for the
    module is not its factors' is refused), else scale 1 and no alpha."""
    if alpha is not None:
        return float(alpha) / rank, float(alpha)
    if peft_config is not None:
        name = _model_name(module)
        peft_config.check_rank(name, rank)
        alpha = None if peft_config.use_rslora else peft_config.alpha_for(name)
        return peft_config.scale_for(name, rank), alpha
    return 1.0, None


def _model_name(module: str) -> str:
    """A PEFT or diffusers file's module as the model names it, which their configs' patterns
    are matched against: without the ``base_model.model.`` (PEFT) or ``transformer.``
    (diffusers) the file adds."""
    for prefix in ("base_model.model.", "transformer."):
        if module.startswith(prefix):
            return module[len(prefix) :]
    return module


LOCON_MID = "has a lora_mid (LoCon Tucker): up@down alone is not its delta"


def split_mid(roles: dict[str, str]) -> tuple[dict[str, str], list[Unmatched]]:
    """A module's roles without its LoCon ``lora_mid`` key, and that key as left out."""
    rest = {role: key for role, key in roles.items() if role != "mid"}
    mid = [Unmatched(roles["mid"], "lora_mid (LoCon mid) ignored")] if "mid" in roles else []
    return rest, mid


def map_lora(
    lora_shapes: Shapes,
    base_shapes: Shapes,
    *,
    alphas: dict[str, float] | None = None,
    peft_config: PeftConfig | None = None,
    source: str = "<lora>",
) -> LoraMapping:
    """Plan which base tensor each LoRA key patches; report every key left over and why.

    ``alphas`` holds the values of the file's ``*.alpha`` keys. A file's ``<m>.alpha`` wins over
    ``peft_config``. When two namings target one base key, the first in file order is used.
    """
    alphas = alphas or {}
    keys = read_keys(lora_shapes, alphas, source)
    resolver = _Resolver(base_shapes)

    def plan(module: str, naming: str, roles: dict[str, str]):
        if naming in DIFF_LEAF:
            return _plan_diff(module, naming, roles["diff"], lora_shapes, resolver)
        key = keys.alpha_keys.get(module)
        alpha = alphas[key] if key is not None else None
        return _plan_lowrank(module, roles, lora_shapes, resolver, key, alpha, peft_config)

    patches, unmatched = first_in_file_order(
        keys,
        plan,
        slot=lambda patch: patch.base_key,
        duplicate=lambda first, patch: (
            f"duplicate target: {patch.base_key} already patched by "
            f"{first.up_key or first.diff_key}"
        ),
    )
    return LoraMapping(patches=patches, unmatched=unmatched)


def first_in_file_order(keys: LoraKeys, plan: Callable, slot: Callable, duplicate: Callable):
    """Each group of ``keys`` (a module in one naming) through ``plan(module, naming, roles)``
    → (found, None) or (None, why not); a found one whose ``slot`` is taken by an earlier group
    is a duplicate (``duplicate(first, found)`` says why). Returns the found ones sorted by
    slot and every key left out with its reason, sorted (an ``.alpha`` no found one uses
    included)."""
    unmatched = [Unmatched(key, "not a LoRA key name") for key in keys.not_lora]
    found: dict = {}
    used_alphas: set[str] = set()
    for (module, naming), all_roles in keys.groups.items():
        roles, mid = split_mid(all_roles)
        unmatched += mid
        item, reason = (None, LOCON_MID) if mid else plan(module, naming, roles)
        if item is not None and slot(item) in found:
            item, reason = None, duplicate(found[slot(item)], item)
        if item is not None:
            found[slot(item)] = item
            if item.alpha_key is not None:
                used_alphas.add(item.alpha_key)
        unmatched.extend(Unmatched(k, reason) for k in roles.values() if reason)
    unmatched += keys.unused_alphas(used_alphas)
    return [found[k] for k in sorted(found)], sorted(unmatched, key=lambda u: u.lora_key)
