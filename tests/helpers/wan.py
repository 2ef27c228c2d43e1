"""A tiny Wan 2.1 transformer built from a config (diffusers' ``WanTransformer3DModel``: no model
hub), its state dict in diffusers' names and, through loraforge's layout table, in Wan's
original names (as Wan's, LightX2V's and ComfyUI's checkpoints hold them), and a fine-tune of it
that changes every tensor."""

from __future__ import annotations

import torch

from loraforge.pipeline.lora.layouts import ORIGINAL, renamed

T2V = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
}
I2V = {**T2V, "image_dim": 24, "added_kv_proj_dim": 32}


def model(config: dict = T2V, seed: int = 0, state: dict | None = None):
    """The tiny transformer in fp32, every tensor random (none left at 0 or 1), or holding
    ``state`` (diffusers' names)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    m = WanTransformer3DModel(**config).float().eval()
    with torch.no_grad():
        for parameter in m.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.05)
    if state is not None:
        m.load_state_dict(state)
    return m


def to_original(state: dict) -> dict:
    """Diffusers' names → Wan's original names, through the layout table."""
    return {renamed(key, ORIGINAL) or key: value for key, value in state.items()}


def fine_tune(state: dict, seed: int = 1) -> dict:
    """Every tensor changed: a rank-3 change on each 2-D weight, noise on the rest."""
    g = torch.Generator().manual_seed(seed)
    tuned = {}
    for key, value in state.items():
        if value.dim() == 2:
            out, inp = value.shape
            change = torch.randn(out, 3, generator=g) @ torch.randn(3, inp, generator=g) * 0.02
        else:
            change = torch.randn(value.shape, generator=g) * 0.01
        tuned[key] = (value + change).contiguous()
    return tuned
