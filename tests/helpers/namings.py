"""One small LoRA written in each ecosystem's naming (LightX2V, kohya, a PEFT adapter directory,
diffusers), all patching the same ``BASE_SHAPES`` modules with the same factors and scales, so a
test can compare what loraforge reads from each against one dense reference."""

from __future__ import annotations

import json
import os

import torch

from .checkpoints import rand, save_lora

# module (base name without .weight) -> (out, in, rank, alpha or None)
MODULES = {
    "blocks.0.attn.q": (48, 32, 4, 2.0),
    "blocks.0.attn.k": (48, 32, 8, 8.0),
    "blocks.0.ffn.0": (64, 32, 4, 8.0),
}
STYLES = ("lightx2v", "kohya", "peft", "diffusers")


def factors(seed: int = 1, dtype=torch.bfloat16) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (up, down), the same for every style."""
    return {
        module: (
            rand(out, rank, seed=seed + i).to(dtype),
            rand(rank, inp, seed=seed + 100 + i).to(dtype),
        )
        for i, (module, (out, inp, rank, _alpha)) in enumerate(MODULES.items())
    }


def _names(style: str, module: str) -> tuple[str, str, str | None]:
    """(up key, down key, alpha key or None) of ``module`` in ``style``."""
    if style == "lightx2v":
        stem = f"diffusion_model.{module}"
        return f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"
    if style == "kohya":
        stem = "lora_unet_" + module.replace(".", "_")
        return f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"
    stem = f"base_model.model.{module}" if style == "peft" else f"transformer.{module}"
    return (
        f"{stem}.lora_B.weight",
        f"{stem}.lora_A.weight",
        None if style == "peft" else f"{stem}.alpha",
    )


def write_styled_lora(directory: str, style: str, seed: int = 1) -> str:
    """The LoRA of ``MODULES`` in ``style``: a file, or (peft) an adapter directory whose
    ``adapter_config.json`` carries r, lora_alpha, rank_pattern and alpha_pattern. Every module's
    scale is alpha / rank in every style."""
    tensors = {}
    for module, (up, down) in factors(seed).items():
        up_key, down_key, alpha_key = _names(style, module)
        tensors[up_key], tensors[down_key] = up, down
        if alpha_key:
            tensors[alpha_key] = torch.tensor(MODULES[module][3])
    if style != "peft":
        return save_lora(directory, f"{style}.safetensors", tensors)
    adapter = os.path.join(directory, "peft_adapter")
    os.makedirs(adapter, exist_ok=True)
    save_lora(adapter, "adapter_model.safetensors", tensors)
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 2,
        "target_modules": ["q", "k", "0"],
        "rank_pattern": {"attn.k": 8},
        "alpha_pattern": {"attn.k": 8, "ffn.0": 8},
    }
    with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return adapter


def module_name(style: str, module: str) -> str:
    """``module`` as ``style`` spells it (the keys' common stem)."""
    return _names(style, module)[0].removesuffix(".lora_up.weight").removesuffix(".lora_B.weight")
