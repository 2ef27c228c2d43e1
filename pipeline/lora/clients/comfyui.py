"""ComfyUI's LoRA loader for Wan (ComfyUI v0.3.64, ``comfy/lora.py::model_lora_keys_unet`` and
``load_lora``, ``comfy/weight_adapter/lora.py``, ``comfy/model_patcher.py::_load_list``).

Wan is kept in its original names under ``diffusion_model.``; ``model_lora_keys_unet`` has no
Wan branch, so a LoRA key reaches a weight only as ``diffusion_model.<module>`` or
``lora_unet_<module with _ for .>`` (``transformer.`` and ``base_model.model.`` names are
"lora key not loaded"). Every pair spelling loraforge reads is taken, with alpha / rank where
an ``.alpha`` exists; ``.diff`` patches the weight, ``.diff_b`` the bias; there is no
``.diff_m``. A ``.modulation.diff`` is consumed but never applied: the model patcher skips
parameters that sit on a module with children, which is where Wan keeps ``modulation``."""

from __future__ import annotations

from ..layouts import ORIGINAL, renamed
from . import Loading, LoraFile, judged

CLIENT = "comfyui"


def verdict(entry) -> str | None:
    module = entry.module
    if module.startswith("diffusion_model."):
        name = module[len("diffusion_model.") :]
        if renamed(f"{name}.{entry.leaf}", ORIGINAL) is not None:
            return "diffusers' module names: ComfyUI loads Wan in its original naming"
    elif not module.startswith("lora_unet_"):
        return "ComfyUI maps Wan LoRA keys as diffusion_model.<name> or lora_unet_<name> only"
    if entry.naming == "diff_m":
        return "ComfyUI reads no .diff_m ('lora key not loaded')"
    if module.endswith("modulation"):
        return "ComfyUI never patches Wan's modulation (a parameter of a module with children)"
    return None


def loading(file: LoraFile) -> Loading:
    return judged(CLIENT, file.entries, verdict)
