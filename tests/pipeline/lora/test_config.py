"""LoRA lists from options and from LightX2V-shaped config files."""

import json

import pytest

from loraforge.pipeline.errors import CheckpointNotFound, UsageError
from loraforge.pipeline.lora.config import (
    LoraSpec,
    MergeConfig,
    config_from_options,
    load_merge_config,
    named_loras,
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
        ({"lora_path": [3]}, "'lora_path' must be a path or a list of paths"),
        ({"lora_path": ["a"], "strength_model": True}, "'strength_model' must be a finite number"),
        ({"lora_configs": {"path": "a"}}, "must be a list"),
        ({"lora_configs": ["a"]}, "lora_configs[0] must be an object"),
        ({"lora_configs": [{"strength": 1}]}, "lora_configs[0]: 'path' must be a non-empty"),
        (
            {"lora_configs": [{"path": "a", "scale": 2}]},
            "lora_configs[0]: unknown field(s) scale; valid: name, path, strength, alpha",
        ),
        (
            {"lora_configs": [{"path": "a", "name": "high"}, {"path": "b"}]},
            "lora_configs[1]: 'name' must be a non-empty string when entries are named, got None",
        ),
        ({"lora_configs": [{"path": "a", "alpha": "x"}]}, "'alpha' must be a finite number"),
        ({}, "names no LoRA"),
    ],
)
def test_malformed_configs(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(UsageError) as info:
        load_merge_config(path, check_files=False)
    assert message in str(info.value) and info.value.path == path


BIG = 10**400  # a JSON integer float64 cannot hold
OUTSIDE = "is outside float32's range (±3.4e+38), in which LoRAs are applied"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"lora_path": ["a"], "strength_model": BIG}, f"'strength_model' {BIG} {OUTSIDE}"),
        (
            {"lora_configs": [{"path": "a", "alpha": -BIG}]},
            f"lora_configs[0]: 'alpha' {-BIG} {OUTSIDE}",
        ),
    ],
)
def test_an_integer_past_float64_is_a_usage_error(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(UsageError) as info:
        load_merge_config(path, check_files=False)
    assert str(info.value) == f"{path}: {message}"


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


# A whole LightX2V inference config, fields as in its configs/distill/wan22/ Wan2.2 MoE files.
MOE = {
    "infer_steps": 4,
    "target_video_length": 81,
    "sample_guide_scale": [3.5, 3.5],
    "enable_cfg": False,
    "boundary_step_index": 2,
    "denoising_step_list": [1000, 750, 500, 250],
    "lora_configs": [
        {"name": "high_noise_model", "path": "high.safetensors", "strength": 1.0},
        {"name": "low_noise_model", "path": "low.safetensors", "strength": 0.5},
        {"name": "high_noise_model", "path": "/abs/extra.safetensors", "strength": 0.25},
    ],
}
UNUSED = (
    "boundary_step_index",
    "denoising_step_list",
    "enable_cfg",
    "infer_steps",
    "sample_guide_scale",
    "target_video_length",
)


def test_whole_inference_config_lists_the_fields_not_used(tmp_path):
    data = {"infer_steps": 4, "lora_dynamic_apply": False, "lora_configs": [{"path": "/a"}]}
    config = load_merge_config(write(tmp_path, data), check_files=False)
    assert config.loras == (LoraSpec("/a", 1.0),)
    assert config.unused == ("infer_steps", "lora_dynamic_apply")
    config = load_merge_config(write(tmp_path, {"lora_path": "/a", "seed": 1}), check_files=False)
    assert config.unused == ("seed",)


def test_config_name_chooses_every_entry_of_that_name_in_order(tmp_path):
    path = write(tmp_path, MOE)
    high = load_merge_config(path, check_files=False, name="high_noise_model")
    assert high.loras == (
        LoraSpec(str(tmp_path / "high.safetensors"), 1.0),
        LoraSpec("/abs/extra.safetensors", 0.25),
    )
    assert (high.name, high.unused) == ("high_noise_model", UNUSED)
    low = load_merge_config(path, check_files=False, name="low_noise_model")
    assert low.loras == (LoraSpec(str(tmp_path / "low.safetensors"), 0.5),)


@pytest.mark.parametrize(
    "data, name, message",
    [
        (
            MOE,
            None,
            "the LoRAs are named (high_noise_model, low_noise_model): choose one with "
            "--config-name NAME",
        ),
        (
            MOE,
            "mid",
            "no lora_configs entry is named 'mid'; names: high_noise_model, low_noise_model",
        ),
        (
            {"lora_configs": [{"path": "a"}]},
            "high_noise_model",
            "--config-name 'high_noise_model' given, but no lora_configs entry carries a 'name'",
        ),
        (
            {"lora_path": "a"},
            "x",
            "--config-name 'x' given, but no lora_configs entry carries a 'name'",
        ),
    ],
)
def test_config_name_refusals(tmp_path, data, name, message):
    path = write(tmp_path, data)
    with pytest.raises(UsageError) as info:
        load_merge_config(path, check_files=False, name=name)
    assert str(info.value) == f"{path}: {message}"
    assert info.value.exit_code == 2


def test_relative_paths_config_directory_first_then_working_directory(tmp_path, monkeypatch):
    configs, work = tmp_path / "configs", tmp_path / "work"
    (configs / "loras").mkdir(parents=True)
    (work / "loras").mkdir(parents=True)
    (configs / "loras" / "beside.safetensors").write_bytes(b"1")
    (work / "loras" / "here.safetensors").write_bytes(b"2")
    (configs / "loras" / "both.safetensors").write_bytes(b"3")
    (work / "loras" / "both.safetensors").write_bytes(b"4")
    monkeypatch.chdir(work)
    data = {
        "lora_configs": [{"path": "loras/beside.safetensors"}, {"path": "loras/here.safetensors"}]
    }
    config = load_merge_config(write(configs, data))
    assert [spec.path for spec in config.loras] == [
        str(configs / "loras" / "beside.safetensors"),
        str(work / "loras" / "here.safetensors"),
    ]
    path = write(configs, {"lora_configs": [{"path": "loras/both.safetensors"}]})
    with pytest.raises(UsageError) as info:
        load_merge_config(path)
    assert str(info.value) == (
        f"{path}: 'loras/both.safetensors' names two different files: "
        f"{configs}/loras/both.safetensors (beside the config) and "
        f"{work}/loras/both.safetensors (from the working directory) "
        "(write the path absolute, or run from the config's directory)"
    )
    monkeypatch.chdir(configs)  # the same file both ways: no conflict
    assert load_merge_config(path).loras == (LoraSpec(str(configs / "loras/both.safetensors")),)


def test_missing_lora_says_where_it_was_looked_for(tmp_path):
    path = write(tmp_path, {"lora_configs": [{"path": "gone.safetensors"}]})
    with pytest.raises(CheckpointNotFound) as info:
        load_merge_config(path)
    assert str(info.value) == (
        f"{path}: names a LoRA that does not exist: {tmp_path}/gone.safetensors (fix the path; "
        "relative paths are read from the config's directory, then from the working directory)"
    )


def test_named_loras_keeps_each_entrys_name(tmp_path):
    data = {
        "infer_steps": 4,
        "lora_configs": [
            {"name": "high_noise_model", "path": "h.safetensors", "strength": 0.5},
            {"path": "both.safetensors"},
            {"name": "low_noise_model", "path": "l.safetensors", "strength": 2},
        ],
    }
    named = named_loras(data, where="c.json", base_dir=str(tmp_path))
    assert named == [
        ("high_noise_model", LoraSpec(str(tmp_path / "h.safetensors"), 0.5)),
        (None, LoraSpec(str(tmp_path / "both.safetensors"), 1.0)),
        ("low_noise_model", LoraSpec(str(tmp_path / "l.safetensors"), 2.0)),
    ]
    shape = {"lora_path": ["a.safetensors"], "strength_model": 0.3}
    assert named_loras(shape, base_dir=str(tmp_path)) == [
        (None, LoraSpec(str(tmp_path / "a.safetensors"), 0.3))
    ]
    assert named_loras({"infer_steps": 4}) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"lora_configs": [{"name": 3, "path": "a"}]},
            "lora_configs[0]: 'name' must be a non-empty string, got 3",
        ),
        ({"lora_configs": {"path": "a"}}, "'lora_configs' must be a list of objects"),
        ({"lora_configs": ["a"]}, "lora_configs[0] must be an object with 'path' and 'strength'"),
        (
            {"lora_configs": [{"path": "a", "strength": "x"}]},
            "lora_configs[0]: 'strength' must be a finite number, got 'x'",
        ),
        (
            {"lora_path": "a", "lora_configs": []},
            "give either 'lora_path' or 'lora_configs', not both",
        ),
    ],
)
def test_named_loras_refusals(data, message):
    with pytest.raises(UsageError) as caught:
        named_loras(data, where="c.json")
    assert str(caught.value) == f"c.json: {message}"
