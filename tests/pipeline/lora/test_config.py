"""LoRA lists from options and from LightX2V-shaped config files."""

import json

import pytest

from loraforge.pipeline.errors import CheckpointNotFound, UsageError
from loraforge.pipeline.lora.config import (
    LoraSpec,
    MergeConfig,
    config_from_options,
    load_merge_config,
    parse_number,
)


def write(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_lora_path_shape_with_relative_paths(tmp_path):
    (tmp_path / "loras").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / "loras" / name).write_bytes(b"")
    data = {"lora_path": ["loras/a.safetensors", "loras/b.safetensors"], "strength_model": 0.7}
    config = load_merge_config(write(tmp_path, data))
    assert config == MergeConfig(
        (
            LoraSpec(str(tmp_path / "loras/a.safetensors"), 0.7),
            LoraSpec(str(tmp_path / "loras/b.safetensors"), 0.7),
        )
    )


def test_lora_configs_shape_and_round_trip(tmp_path):
    data = {
        "lora_configs": [
            {"path": "/abs/a.safetensors", "strength": 0.8},
            {"path": "b", "alpha": 16, "strength": 2},
            {"path": "c", "alpha": None},
        ]
    }
    config = load_merge_config(write(tmp_path, data), check_files=False)
    assert config.loras == (
        LoraSpec("/abs/a.safetensors", 0.8),
        LoraSpec(str(tmp_path / "b"), 2.0, 16.0),
        LoraSpec(str(tmp_path / "c"), 1.0),
    )
    assert MergeConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["lora_configs"][1] == {
        "path": str(tmp_path / "b"),
        "strength": 2.0,
        "alpha": 16.0,
    }


def test_a_single_lora_path_string(tmp_path):
    config = load_merge_config(write(tmp_path, {"lora_path": "x.safetensors"}), check_files=False)
    assert config.loras == (LoraSpec(str(tmp_path / "x.safetensors"), 1.0),)


@pytest.mark.parametrize(
    "data, message",
    [
        ([1], "must be a JSON object"),
        ({"lora_path": ["a"], "lora_configs": []}, "not both"),
        (
            {"lora_path": ["a"], "seed": 1},
            "unknown field(s) seed; valid: lora_path, strength_model",
        ),
        ({"lora_configs": [{"path": "a"}], "strength_model": 1}, "unknown field(s) strength_model"),
        ({"lora_path": [3]}, "'lora_path' must be a path or a list of paths"),
        ({"lora_path": ["a"], "strength_model": True}, "'strength_model' must be a finite number"),
        ({"lora_configs": {"path": "a"}}, "must be a list"),
        ({"lora_configs": ["a"]}, "lora_configs[0] must be an object"),
        ({"lora_configs": [{"strength": 1}]}, "lora_configs[0]: 'path' must be a non-empty"),
        ({"lora_configs": [{"path": "a", "name": "low"}]}, "unknown field(s) name"),
        ({"lora_configs": [{"path": "a", "alpha": "x"}]}, "'alpha' must be a finite number"),
        ({}, "names no LoRA"),
    ],
)
def test_malformed_configs(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(UsageError) as info:
        load_merge_config(path, check_files=False)
    assert message in str(info.value) and info.value.path == path


def test_missing_config_and_missing_lora(tmp_path):
    with pytest.raises(CheckpointNotFound, match="merge config not found"):
        load_merge_config(str(tmp_path / "none.json"))
    path = write(tmp_path, {"lora_path": ["gone.safetensors"]})
    with pytest.raises(CheckpointNotFound, match="gone.safetensors") as info:
        load_merge_config(path)
    assert info.value.path == path


def test_config_from_options():
    config = config_from_options(["/a", "/b"], ["0.5", "-1e-1"])
    assert config.loras == (LoraSpec("/a", 0.5), LoraSpec("/b", -0.1))
    assert config_from_options(["/a"], []).loras == (LoraSpec("/a", 1.0),)
    with pytest.raises(UsageError, match="1 --strength value"):
        config_from_options(["/a", "/b"], ["1"])
    with pytest.raises(UsageError, match="no LoRA given"):
        config_from_options([], [])


@pytest.mark.parametrize("text", ["abc", "", "1,5", "inf", "nan"])
def test_parse_number_refuses(text):
    with pytest.raises(UsageError) as info:
        parse_number(text, "--strength")
    assert info.value.exit_code == 2
