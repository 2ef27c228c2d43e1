"""Scaled-fp8 checkpoints in each convention, quantized here independently of loraforge's
stage (amax / 448, clamp, round to nearest), and their dequantized values by the loaders'
formula ``W = W_fp8.float() · scale``."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

TOP = 448.0  # float8_e4m3fn's largest finite value
# Which key holds a weight's scale, per convention.
SCALE = {"scaled_fp8": ".scale_weight", "comfy_quant": ".weight_scale", "lightx2v": ".weight_scale"}


def quantize(w: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_row else w.abs().amax()
    scale = amax / TOP
    return (w / scale).clamp(-TOP, TOP).to(torch.float8_e4m3fn), scale


def dequant(w8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if scale.numel() > 1:
        scale = scale.reshape(-1, 1)
    return w8.float() * scale.float().reshape(scale.shape if scale.numel() > 1 else ())


def scaled(tensors: dict, keys, convention: str, per_row: bool = False) -> tuple[dict, dict | None]:
    """``tensors`` with ``keys`` stored as fp8 plus their scales in ``convention``'s names, the
    convention's marker or header metadata; returns (tensors, metadata)."""
    out = dict(tensors)
    layers = {}
    for key in keys:
        w8, scale = quantize(tensors[key], per_row)
        stem = key.removesuffix(".weight")
        out[key] = w8
        out[stem + SCALE[convention]] = scale
        layers[stem] = {"format": "float8_e4m3fn"}
    metadata = None
    if convention == "scaled_fp8":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    elif convention == "comfy_quant":
        metadata = {
            "_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})
        }
    return out, metadata


def save(tensors: dict, path, metadata: dict | None = None) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def value(stored: dict, key: str, convention: str) -> torch.Tensor:
    """A weight's value as the loaders see it (dequantized if it has a scale)."""
    scale = stored.get(key.removesuffix(".weight") + SCALE[convention])
    if scale is None or key.endswith(SCALE[convention]):
        return stored[key].float()
    return dequant(stored[key], scale)
