"""LightX2V's LoRA loader (``lightx2v/utils/lora_loader.py::LoRALoader.apply_lora``, the default
merge path of its Wan runners, ModelTC/LightX2V at f8aee98): every pair spelling loraforge reads
(``lora_up/lora_down``, ``lora_B/lora_A``, ...), alpha / rank where an ``.alpha`` key is
non-zero, ``.diff`` / ``.diff_b`` / ``.diff_m`` onto ``.weight`` / ``.bias`` / ``.modulation``;
a key's first ``diffusion_model.``, ``model.`` or ``unet.`` is stripped to find the weight in
the model, which has Wan's original names. Keys it cannot place are logged as "Unused"."""

from __future__ import annotations

from ..layouts import ORIGINAL, renamed
from . import Loading, LoraFile, judged

CLIENT = "lightx2v"
STRIPPED = ("diffusion_model.", "model.", "unet.")  # _get_model_key: the first one found
UNREAD = ("lora_unet_", "transformer.", "base_model.model.")


def _name(module: str) -> str:
    for prefix in STRIPPED:
        if module.startswith(prefix):
            return module[len(prefix) :]
    return module


def verdict(entry) -> str | None:
    if entry.module.startswith(UNREAD):
        return "LightX2V reads Wan's original names, bare or under diffusion_model."
    if renamed(f"{_name(entry.module)}.{entry.leaf}", ORIGINAL) is not None:
        return "diffusers' module names: LightX2V loads Wan in its original naming"
    if entry.kind == "lowrank" and len(entry.shape) != 2:
        return "not a 2-D pair: LightX2V applies 2-D up/down only ('Unexpected LoRA shape')"
    return None


def loading(file: LoraFile) -> Loading:
    return judged(CLIENT, file.entries, verdict)
