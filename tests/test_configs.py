"""Every example in configs/ is loaded by the loader of the command it is for."""

import json
from pathlib import Path

import pytest

from loraforge.pipeline.lora.config import MergeConfig, load_merge_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))


def test_there_are_examples():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_loads(path):
    if path.name.startswith("infer"):
        return check_inference_config(path)
    if not path.name.startswith("merge"):
        pytest.fail(f"{path.name}: no loader known for this config; add one to this test")
    names = [e.get("name") for e in json.loads(path.read_text()).get("lora_configs", [])]
    for name in dict.fromkeys(names) or [None]:  # named entries (Wan2.2 MoE): each in turn
        config = load_merge_config(str(path), check_files=False, name=name)
        assert config.loras and config.name == name
        for spec in config.loras:  # relative paths: the config's directory first
            assert Path(spec.path).is_absolute() and Path(spec.path).is_relative_to(path.parent)
        assert MergeConfig.from_dict(config.to_dict()) == config


def check_inference_config(path):
    """An inference config (scripts/wan/ runs them) read as ``loraforge infer`` reads it."""
    from loraforge.pipeline.runtime.models import MODEL_CLASSES
    from loraforge.pipeline.runtime.settings import read_settings

    model = MODEL_CLASSES["wan2.2_moe_distill" if "wan22" in path.name else "wan2.1_distill"]
    settings = read_settings(str(path), model)
    assert settings.steps == 4 and settings.loras and not settings.enable_cfg
    assert {name for name, _spec in settings.loras} == (
        {"high_noise_model", "low_noise_model"} if model.moe else {None}
    )
    assert set(settings.ignored) >= {"self_attn_1_type", "cpu_offload"}
