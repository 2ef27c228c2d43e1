"""Reference formulas and small utilities shared by tests."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

PREFIX = "diffusion_model."


def apply_reference(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict:
    """W + (alpha/rank)·up@down for LoRA pairs, W + diff for diffs; fp32."""
    merged = {k: v.float().clone() for k, v in base.items()}
    for key, up in lora.items():
        if key.endswith(".lora_up.weight"):
            stem = key[len(PREFIX) : -len(".lora_up.weight")]
            down = lora[f"{PREFIX}{stem}.lora_down.weight"].float()
            alpha = float(lora.get(f"{PREFIX}{stem}.alpha", torch.tensor(down.shape[0])))
            merged[stem + ".weight"] += alpha / down.shape[0] * (up.float() @ down)
        for suffix, original in (
            (".diff", ".weight"),
            (".diff_b", ".bias"),
            (".diff_m", ".modulation"),
        ):
            if key.endswith(suffix):
                stem = key[len(PREFIX) : -len(suffix)]
                merged[stem + original] += up.float()
    return merged


def rel_error(a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor) -> float:
    """‖a − b‖ / ‖reference‖ in fp64."""
    return float((a.double() - b.double()).norm() / reference.double().norm())


def load_output(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a single file or a sharded output (via its index)."""
    index = path + ".index.json"
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for shard in shards:
            out.update(load_file(os.path.join(os.path.dirname(path), shard)))
        return out
    return load_file(path)


def read_report(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def lowrank_product(up, down):
    """up @ down in fp64, conv-shaped factors flattened."""
    return up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)


def assert_close(actual, expected, rtol=2e-6):
    """Equal within fp32 rounding: max |error| relative to the largest |value|."""
    actual, expected = actual.double(), expected.double()
    scale = max(float(expected.abs().max()), 1e-30)
    assert float((actual - expected).abs().max()) <= rtol * scale
