"""The LoRA config a diffusers file keeps in its header (``lora_adapter_metadata``): a model's own
config, or one section per model of a pipeline, read as diffusers' loaders read it."""

import json

import pytest
import torch
from safetensors.torch import save_file

from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.lora.adapter_config import PeftConfig
from loraforge.pipeline.lora.inputs import read_lora


def diffusers_file(tmp_path, prefix: str, config: dict) -> str:
    path = str(tmp_path / "lora.safetensors")
    tensors = {
        f"{prefix}x.lora_A.weight": torch.ones(4, 3),
        f"{prefix}x.lora_B.weight": torch.ones(5, 4),
    }
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config)}
    save_file(tensors, path, metadata=metadata)
    return path


def section(prefix: str, r: int, alpha: float) -> dict:
    return {f"{prefix}r": r, f"{prefix}lora_alpha": alpha, f"{prefix}target_modules": ["x"]}


@pytest.mark.parametrize(
    "prefix, config",
    [
        # a pipeline's config (save_lora_weights): one section per model, the denoiser's read
        ("transformer.", {**section("transformer.", 4, 8), **section("text_encoder.", 2, 1)}),
        ("unet.", {**section("unet.", 4, 8), **section("text_encoder.", 2, 1)}),
        # a model's own config (save_lora_adapter): no prefix
        ("", section("", 4, 8)),
    ],
    ids=["transformer", "unet", "model"],
)
def test_the_denoisers_section_scales_the_lora(tmp_path, prefix, config):
    opened = read_lora(diffusers_file(tmp_path, prefix, config))
    assert opened.peft == PeftConfig(r=4, lora_alpha=8.0)
    assert opened.config is None


def test_a_config_alpha_for_a_diffusers_file_names_where_its_alpha_is(tmp_path):
    path = diffusers_file(tmp_path, "transformer.", section("transformer.", 4, 8))
    with pytest.raises(UsageError) as info:
        read_lora(path, alpha=2.0)
    assert str(info.value) == (
        f"{path}: a config 'alpha' for a diffusers LoRA (header lora_adapter_metadata), which "
        "has its own lora_alpha (drop 'alpha' from this lora_configs entry)"
    )
