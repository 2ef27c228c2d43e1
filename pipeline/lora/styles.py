"""Key styles: how a written LoRA spells its keys, where each module's alpha lives, and what it
cannot hold. One name table (``KEY_STYLES``) feeds ``--key-style``/``--to``, their help and
validation; every command that writes a LoRA names its entries through it.

Names come from the checkpoint: a low-rank entry is named from the key of the weight it patches
(``<module>.weight``), a full diff from the key of its tensor (``<module>.weight``, ``.bias``,
``.modulation``). The style adds its prefix and suffixes:

- ``lightx2v``: ``diffusion_model.<m>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``;
  diffs ``diffusion_model.<m>.diff`` / ``.diff_b`` / ``.diff_m``
- ``kohya``: ``lora_unet_<m with _ for .>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``;
  diffs ``lora_unet_<m_>.diff`` / ``.diff_b`` / ``.diff_m``
- ``peft``: ``base_model.model.<m>.lora_B.weight`` / ``.lora_A.weight``; alphas in
  ``adapter_config.json``; no full diffs
- ``diffusers``: ``transformer.<m>.lora_B.weight`` / ``.lora_A.weight``; alphas in the header's
  ``lora_adapter_metadata``; no full diffs

Scale is alpha / rank in every style, so converting never changes a merge. PEFT writes a
directory (``adapter_model.safetensors`` + ``adapter_config.json``); diffusers keeps the same
LoRA config in the header's ``lora_adapter_metadata`` (its loaders refuse keys without "lora"
in them, so an ``.alpha`` key would make the file unloadable there)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

DIFF_SUFFIXES = {".weight": ".diff", ".bias": ".diff_b", ".modulation": ".diff_m"}


@dataclass(frozen=True)
class KeyStyle:
    name: str
    help: str
    prefix: str
    up: str  # suffix of the up factor (out x r)
    down: str  # suffix of the down factor (r x in)
    alpha_in: str  # "key" (a <stem>.alpha tensor) | "config" (adapter_config.json) | "metadata"
    diffs: bool  # whether full diffs (.diff, .diff_b, .diff_m) can be written
    underscores: bool = False  # kohya: the module path written with "_" for "."
    directory: bool = False  # PEFT: a directory with adapter_model.safetensors + config
    title: str = ""  # how messages spell it, when not as its name

    def stem(self, module: str) -> str:
        return self.prefix + (module.replace(".", "_") if self.underscores else module)

    def lowrank_names(self, key: str) -> dict[str, str]:
        """Role (up, down and, where alpha is a key, alpha) → output key for the weight
        ``key`` (``<module>.weight``)."""
        stem = self.stem(module_of(key))
        names = {"up": stem + self.up, "down": stem + self.down}
        if self.alpha_in == "key":
            names["alpha"] = stem + ".alpha"
        return names

    def diff_name(self, key: str) -> str | None:
        """The output key of the full diff of checkpoint tensor ``key``; None when this style
        cannot hold it (``cannot_hold`` says why)."""
        if not self.diffs:
            return None
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


def module_of(key: str) -> str:
    """``<module>.weight`` → ``<module>``."""
    return key.removesuffix(".weight")


KEY_STYLES: dict[str, KeyStyle] = {
    style.name: style
    for style in (
        KeyStyle(
            "lightx2v",
            "diffusion_model.NAME.lora_up/lora_down.weight + .alpha, .diff/.diff_b/.diff_m "
            "(LightX2V, ComfyUI)",
            "diffusion_model.",
            ".lora_up.weight",
            ".lora_down.weight",
            "key",
            diffs=True,
            title="LightX2V",
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
            underscores=True,
        ),
        KeyStyle(
            "peft",
            "a directory: adapter_model.safetensors (base_model.model.NAME.lora_A/lora_B."
            "weight) + adapter_config.json; no full diffs",
            "base_model.model.",
            ".lora_B.weight",
            ".lora_A.weight",
            "config",
            diffs=False,
            directory=True,
        ),
        KeyStyle(
            "diffusers",
            "transformer.NAME.lora_A/lora_B.weight, alphas in the header's "
            "lora_adapter_metadata; no full diffs",
            "transformer.",
            ".lora_B.weight",
            ".lora_A.weight",
            "metadata",
            diffs=False,
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
    if style.alpha_in == "key":
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
