"""Tiny checkpoints generated per test into tmp_path."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

# Small enough to be fast, large enough that the planner factors the 2-D weights.
MIN_PARAMS = 10_000


def pair_tensors(seed: int = 0, dtype=torch.bfloat16) -> tuple[dict, dict]:
    """A base/fine-tune pair shaped like a tiny transformer block, with every planning case:
    low-rank deltas (exact rank 6 plus a small full-rank tail), biases, a modulation, a 3-D
    tensor too large for a diff-free plan, an unchanged norm and a key in one model only."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    base = {
        "blocks.0.attn.q.weight": randn(96, 128),
        "blocks.0.attn.q.bias": randn(96),
        "blocks.0.ffn.0.weight": randn(160, 96),
        "blocks.0.ffn.0.bias": randn(160),
        "blocks.0.modulation": randn(1, 6, 32),
        "blocks.0.norm.weight": torch.ones(32),
        "patch_embedding.weight": randn(64, 4, 2, 2, 20),
        "head.weight": randn(8, 32),
        "only_in_base.weight": randn(4, 4),
    }
    target = {k: v.clone() for k, v in base.items() if k != "only_in_base.weight"}
    for key in ("blocks.0.attn.q.weight", "blocks.0.ffn.0.weight"):
        out, inp = base[key].shape
        target[key] += randn(out, 6, std=0.05) @ randn(6, inp, std=0.05) * 40
        target[key] += randn(out, inp, std=1e-4)
    for key in (
        "blocks.0.attn.q.bias",
        "blocks.0.ffn.0.bias",
        "blocks.0.modulation",
        "patch_embedding.weight",
        "head.weight",
    ):
        target[key] += randn(*base[key].shape, std=1e-3)
    target["only_in_target.bias"] = randn(4)
    return ({k: v.to(dtype) for k, v in base.items()}, {k: v.to(dtype) for k, v in target.items()})


@pytest.fixture
def pair(tmp_path) -> tuple[str, str]:
    base, target = pair_tensors()
    paths = str(tmp_path / "base.safetensors"), str(tmp_path / "target.safetensors")
    save_file(base, paths[0])
    save_file(target, paths[1])
    return paths


def save_sharded(tensors: dict, directory: str, shards: int = 2, index: bool = True) -> None:
    """Hugging Face shards (and optionally the index) of ``tensors``."""
    import json

    os.makedirs(directory, exist_ok=True)
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, os.path.join(directory, name))
        weight_map.update({k: name for k in part})
    if index:
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
