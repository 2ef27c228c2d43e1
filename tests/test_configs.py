"""Every example in configs/ is loaded by the loader of the command it is for."""

from pathlib import Path

import pytest

from loraforge.pipeline.lora.config import MergeConfig, load_merge_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.json"))


def test_there_are_examples():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_loads(path):
    if not path.name.startswith("merge"):
        pytest.fail(f"{path.name}: no loader known for this config; add one to this test")
    config = load_merge_config(str(path), check_files=False)
    assert config.loras
    for spec in config.loras:  # relative paths are read from the config's directory
        assert Path(spec.path).is_absolute() and Path(spec.path).is_relative_to(path.parent)
    assert MergeConfig.from_dict(config.to_dict()) == config
