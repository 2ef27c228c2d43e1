"""LightX2V's output key names, which its loader, its merger and ComfyUI-style loaders read."""

from __future__ import annotations

PREFIX = "diffusion_model."
DIFF_SUFFIXES = {".weight": ".diff", ".bias": ".diff_b", ".modulation": ".diff_m"}


def lowrank_names(key: str) -> dict[str, str]:
    """``<key minus .weight>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``."""
    stem = PREFIX + key.removesuffix(".weight")
    return {
        "up": f"{stem}.lora_up.weight",
        "down": f"{stem}.lora_down.weight",
        "alpha": f"{stem}.alpha",
    }


def diff_name(key: str) -> str | None:
    """``.weight`` → ``.diff``, ``.bias`` → ``.diff_b``, ``.modulation`` → ``.diff_m``; other
    suffixes have no name in LightX2V's scheme (None)."""
    for suffix, replacement in DIFF_SUFFIXES.items():
        if key.endswith(suffix):
            return PREFIX + key[: -len(suffix)] + replacement
    return None
