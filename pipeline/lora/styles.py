"""Key styles: how a written LoRA spells its keys, in which model layout, where each module's
alpha lives, and what it cannot hold. One name table (``KEY_STYLES``) feeds
``--key-style``/``--to``, their help and validation; every command that writes a LoRA names its
entries through it.

Names come from the checkpoint: a low-rank entry is named from the key of the weight it patches
(``<module>.weight``), a full diff from the key of its tensor (``<module>.weight``, ``.bias``,
``.modulation``), both renamed into the style's layout where ``layouts.py`` knows the model
family (Wan: original names for LightX2V, ComfyUI and kohya; diffusers' names for diffusers).
The style adds its prefix and suffixes:

- ``lightx2v``: ``diffusion_model.<m>.lora_up.weight`` / ``.lora_down.weight``, an
  ``diffusion_model.<m>.alpha`` only where alpha differs from the rank; diffs
  ``diffusion_model.<m>.diff_b`` / ``.diff_m`` / ``.diff``
- ``kohya``: ``lora_unet_<m with _ for .>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``;
  diffs ``lora_unet_<m_>.diff`` / ``.diff_b`` / ``.diff_m``
- ``peft``: ``base_model.model.<m>.lora_B.weight`` / ``.lora_A.weight``; alphas in
  ``adapter_config.json``; no ``.diff`` keys
- ``diffusers``: ``transformer.<m>.lora_B.weight`` / ``.lora_A.weight``; alphas in the header's
  ``lora_adapter_metadata``; no ``.diff`` keys

A 2-D weight's full diff is written as an exact pair in every style (the diff and an identity,
``diff_pair``): each loader applies a pair, while diffusers drops (or fails on) a weight's
``.diff``. Scale is alpha / rank in every style, so converting never changes a merge. PEFT
writes a directory (``adapter_model.safetensors`` + ``adapter_config.json``); diffusers keeps
the same LoRA config in the header's ``lora_adapter_metadata`` (its loaders refuse keys without
"lora" in them, so an ``.alpha`` key would make the file unloadable there). Which client
applies what of a file: ``clients/``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import UsageError
from .layouts import DIFFUSERS, ORIGINAL, ModelLayout, detect_layout

DIFF_SUFFIXES = {".weight": ".diff", ".bias": ".diff_b", ".modulation": ".diff_m"}


@dataclass(frozen=True)
class KeyStyle:
    name: str
    help: str
    prefix: str
    up: str  # suffix of the up factor (out x r)
    down: str  # suffix of the down factor (r x in)
    # Where alpha goes: "key" (a <stem>.alpha tensor, always), "key_unless_rank" (a <stem>.alpha
    # tensor only where alpha differs from the rank: the loaders read a missing alpha as scale
    # 1, and diffusers refuses alphas outside Wan's blocks), "config" (adapter_config.json) or
    # "metadata" (the header's lora_adapter_metadata).
    alpha_in: str
    diffs: bool  # whether full diffs (.diff, .diff_b, .diff_m) can be written
    layout: str | None = None  # a known model family's names written in this layout; None: as is
    underscores: bool = False  # kohya: the module path written with "_" for "."
    directory: bool = False  # PEFT: a directory with adapter_model.safetensors + config
    title: str = ""  # how messages spell it, when not as its name
    clients: tuple[str, ...] = ()  # the loaders this style writes for (``clients/``)
    family: ModelLayout | None = None  # the model's family, when known (``for_model``)
    family_layout: str | None = None  # and the layout its names are in

    def for_model(self, names) -> KeyStyle:
        """This style for a model whose tensors are ``names``: a model of a known family in the
        other layout than the style's has its names renamed (``relaid``); any other model's
        names (unknown, mixed, or already in the style's layout) are written as they are."""
        found = detect_layout(names)
        family, layout = found if found is not None else (None, None)
        return dataclasses.replace(self, family=family, family_layout=layout)

    def relaid(self, name: str) -> str:
        """``name`` (a checkpoint key or module path) in this style's layout (``layouts.py``)
        when the model is of a known family in the other layout (``for_model``)."""
        if self.family is None or self.layout in (None, self.family_layout):
            return name
        return self.family.rename(name, self.layout) or name

    def stem(self, module: str) -> str:
        module = self.relaid(module)
        return self.prefix + (module.replace(".", "_") if self.underscores else module)

    def lowrank_names(self, key: str, alpha_is_rank: bool = True) -> dict[str, str]:
        """Role (up, down and, where alpha is a key, alpha) → output key for the weight
        ``key`` (``<module>.weight``); ``alpha_is_rank``: its scale alpha / rank is 1."""
        stem = self.stem(module_of(key))
        names = {"up": stem + self.up, "down": stem + self.down}
        if self.alpha_in == "key" or (self.alpha_in == "key_unless_rank" and not alpha_is_rank):
            names["alpha"] = stem + ".alpha"
        return names

    def diff_outputs(
        self, key: str, shape: tuple[int, ...], keep_diff: bool = False
    ) -> dict[str, str] | None:
        """Role → output key for the full diff of checkpoint tensor ``key``: a 2-D weight is
        written as an exact pair, the diff and an identity (``diff_pair``), which LightX2V,
        ComfyUI and diffusers all apply (diffusers drops, or fails on, a ``.diff`` of a weight);
        with ``keep_diff`` (extract's ``--diff-only``) a style that holds diffs writes
        ``.diff``. Others: ``.diff`` / ``.diff_b`` / ``.diff_m``; None when the style cannot
        hold it (``cannot_hold`` says why)."""
        if len(shape) == 2 and key.endswith(".weight") and not (keep_diff and self.diffs):
            return self.lowrank_names(key)
        name = self.diff_name(key)
        return None if name is None else {"diff": name}

    def diff_name(self, key: str) -> str | None:
        """The ``.diff`` / ``.diff_b`` / ``.diff_m`` output key of checkpoint tensor ``key``;
        None when this style cannot hold it."""
        if not self.diffs:
            return None
        key = self.relaid(key)
        for suffix, replacement in DIFF_SUFFIXES.items():
            if key.endswith(suffix) and len(key) > len(suffix):
                return self.stem(key[: -len(suffix)]) + replacement
        return None

    def cannot_hold(self, key: str) -> str:
        """Why the full diff of ``key`` has no name in this style."""
        if not self.diffs:
            return (
                f"the {self.name} key style holds only lora_A/lora_B pairs, not a full diff "
                "(the lightx2v and kohya styles keep it; extract's --lowrank-min-params 0 "
                "factors small 2-D weights too)"
            )
        return (
            f"no {self.title or self.name} name for this suffix (only .weight, .bias, .modulation)"
        )


class DiffPair(NamedTuple):
    rank: int
    holder: str  # the factor (role) that holds the diff
    identity: str  # the other factor: the rank x rank identity


def diff_pair(delta_shape: tuple[int, ...]) -> DiffPair:
    """The exact pair that writes a 2-D diff D (out x in): its rank and which factor holds D,
    ``up`` = D with ``down`` = the in x in identity when in <= out, else ``up`` = the
    out x out identity with ``down`` = D. up @ down = D exactly in every float format."""
    out, inputs = delta_shape
    return DiffPair(inputs, "up", "down") if inputs <= out else DiffPair(out, "down", "up")


def module_of(key: str) -> str:
    """``<module>.weight`` → ``<module>``."""
    return key.removesuffix(".weight")


KEY_STYLES: dict[str, KeyStyle] = {
    style.name: style
    for style in (
        KeyStyle(
            "lightx2v",
            "diffusion_model.NAME.lora_up/lora_down.weight (+ .alpha where it is not the rank), "
            ".diff/.diff_b/.diff_m, Wan's original names (LightX2V, ComfyUI, diffusers)",
            "diffusion_model.",
            ".lora_up.weight",
            ".lora_down.weight",
            "key_unless_rank",
            diffs=True,
            layout=ORIGINAL,
            title="LightX2V",
            clients=("lightx2v", "comfyui", "diffusers"),
        ),
        KeyStyle(
            "kohya",
            "lora_unet_NAME_WITH_UNDERSCORES.lora_up/lora_down.weight + .alpha, .diff/.diff_b "
            "(ComfyUI, kohya/musubi tools)",
            "lora_unet_",
            ".lora_up.weight",
            ".lora_down.weight",
            "key",
            diffs=True,
            layout=ORIGINAL,
            underscores=True,
            clients=("comfyui", "diffusers"),
        ),
        KeyStyle(
            "peft",
            "a directory: adapter_model.safetensors (base_model.model.NAME.lora_A/lora_B."
            "weight) + adapter_config.json, the base's module names; no .diff keys",
            "base_model.model.",
            ".lora_B.weight",
            ".lora_A.weight",
            "config",
            diffs=False,
            directory=True,
            clients=("peft",),
        ),
        KeyStyle(
            "diffusers",
            "transformer.NAME.lora_A/lora_B.weight in diffusers' module names, alphas in the "
            "header's lora_adapter_metadata; no .diff keys",
            "transformer.",
            ".lora_B.weight",
            ".lora_A.weight",
            "metadata",
            diffs=False,
            layout=DIFFUSERS,
            clients=("diffusers",),
        ),
    )
}
DEFAULT_STYLE = "lightx2v"
KEY_STYLE_HELP = "; ".join(f"{s.name}: {s.help}" for s in KEY_STYLES.values())


def key_style(name: str, option: str = "--key-style") -> KeyStyle:
    """The style called ``name``; an unknown name lists the valid ones."""
    try:
        return KEY_STYLES[name]
    except KeyError:
        valid = ", ".join(KEY_STYLES)
        raise UsageError(f"unknown {option} {name!r}; valid: {valid}") from None


def check_output(
    style: KeyStyle, output_format: str, max_shard_size: int | None, option: str = "--key-style"
) -> None:
    """PEFT and diffusers loaders read one safetensors file, with the scaling beside it (the
    adapter config, the header): refuse what would lose it. ``option`` chose the style."""
    if style.alpha_in in ("key", "key_unless_rank"):  # a file loaders read whole
        return
    if output_format != "safetensors":
        raise UsageError(
            f"{option} {style.name} is written as safetensors only (its alphas live in "
            f"{'adapter_config.json' if style.directory else 'the safetensors header'})",
            hint="drop --output-format pytorch",
        )
    if max_shard_size:
        raise UsageError(
            f"{option} {style.name}: its loaders read one file, so it is never sharded",
            hint="drop --max-shard-size",
        )
