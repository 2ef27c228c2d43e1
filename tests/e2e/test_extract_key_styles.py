"""``extract --key-style``: each style holds the same tensors as converting the default
extraction, a sharded LoRA keeps each weight's entries in one shard, and a PEFT adapter loads
with the peft package and merges to loraforge's weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers.checkpoints import MIN_PARAMS
from tests.helpers.cli import run_cli

Q, F = "blocks.0.attn.q", "blocks.0.ffn.0"


def extract(pair, output, *extra, rank="4") -> None:
    source, target = pair
    result = run_cli(
        "extract", "--source-model", source, "--target-model", target, "--output", output,
        "--rank", rank, "--lowrank-min-params", MIN_PARAMS, "--quiet", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def weights_of(path) -> dict:
    path = str(path)
    return load_file(
        os.path.join(path, "adapter_model.safetensors") if os.path.isdir(path) else path
    )


def header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def default_lora(pair_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("styles") / "lightx2v.safetensors"
    extract(pair_files, out)
    return out


@pytest.mark.parametrize("style", ["kohya", "peft", "diffusers"])
def test_each_style_holds_what_converting_the_default_gives(
    pair_files, default_lora, tmp_path, style
):
    suffix = "" if style == "peft" else ".safetensors"
    extract(pair_files, tmp_path / f"x{suffix}", "--key-style", style)
    result = run_cli(
        "convert", default_lora, tmp_path / "c", "--to", style, "--base", pair_files[0]
    )
    assert result.exit_code == 0, result.output
    ours, converted = weights_of(tmp_path / f"x{suffix}"), weights_of(tmp_path / f"c{suffix}")
    assert ours.keys() == converted.keys()
    assert all(
        torch.equal(ours[k], converted[k]) and ours[k].dtype == converted[k].dtype for k in ours
    )
    if style == "peft":
        configs = [json.load(open(tmp_path / d / "adapter_config.json")) for d in ("x", "c")]
        assert configs[0] == configs[1]
        assert configs[0]["target_modules"] == [Q, F, "head"]  # head: its diff as a pair
    if style == "diffusers":
        assert header(tmp_path / "x.safetensors") == header(tmp_path / "c.safetensors")


def test_peft_extraction_lists_the_diffs_it_cannot_hold(pair_files, tmp_path):
    source, target = pair_files
    result = run_cli(
        "extract", "--source-model", source, "--target-model", target, "--output",
        tmp_path / "adapter", "--rank", "4", "--lowrank-min-params", MIN_PARAMS,
        "--key-style", "peft",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    # The biases, the modulation and the 5-D patch embedding; the 2-D head's diff is a pair.
    assert "4 tensors changed but not in the LoRA, e.g. 'blocks.0.attn.q.bias': the peft key " in (
        result.output
    )
    report = json.load(open(tmp_path / "adapter.report.json"))
    assert "holds only lora_A/lora_B pairs" in report["tensors"]["blocks.0.modulation"]["note"]
    # the report and the work directory sit beside the adapter, not in it
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert os.path.isdir(tmp_path / "adapter.work")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-shard-size", "1KB"], "--key-style peft: its loaders read one file"),
        (["--output-format", "pytorch"], "--key-style peft is written as safetensors only"),
    ],
)
def test_peft_refuses_what_would_lose_its_config(pair_files, tmp_path, extra, message):
    source, target = pair_files
    result = run_cli(
        "extract", "--source-model", source, "--target-model", target, "--output",
        tmp_path / "adapter", "--key-style", "peft", *extra,
    )  # fmt: skip
    assert result.exit_code == 2
    assert message in result.output


def test_sharded_lora_keeps_each_weight_in_one_shard(pair_files, tmp_path):
    out = tmp_path / "lora.safetensors"
    extract(pair_files, out, "--max-shard-size", "3KB", "--key-style", "kohya")
    index = json.load(open(str(out) + ".index.json"))["weight_map"]
    assert len(set(index.values())) > 2
    for module in ("lora_unet_blocks_0_attn_q", "lora_unet_blocks_0_ffn_0"):
        shards = {
            index[f"{module}.{leaf}"] for leaf in ("alpha", "lora_down.weight", "lora_up.weight")
        }
        assert len(shards) == 1, (module, shards)


PEFT_SCRIPT = """
import sys
import torch
from safetensors.torch import load_file, save_file
from peft import PeftModel

base = load_file(sys.argv[1])
block = torch.nn.Module()
block.attn = torch.nn.ModuleDict({"q": torch.nn.Linear(128, 96)})
block.ffn = torch.nn.ModuleList([torch.nn.Linear(96, 160)])
model = torch.nn.Module()
model.blocks = torch.nn.ModuleList([block])
model.load_state_dict({k: base[k] for k in model.state_dict()})
merged = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, sys.argv[3])
"""


@pytest.mark.slow
def test_a_peft_extraction_loads_with_peft_as_loraforge_merges_it(pair_files, tmp_path):
    import peft  # noqa: F401  (a test dependency: a failed import fails the test, never skips it)

    source, _target = pair_files
    adapter = tmp_path / "adapter"
    extract(pair_files, adapter, "--key-style", "peft")
    base_fp32 = tmp_path / "base_fp32.safetensors"
    # peft patches the model's own dtype; give both sides the same fp32 base
    from safetensors.torch import save_file

    save_file({k: v.float() for k, v in load_file(source).items()}, str(base_fp32))
    script = tmp_path / "load.py"
    script.write_text(PEFT_SCRIPT)
    out = tmp_path / "peft_merged.safetensors"
    # its own process, outside the repository: transformers probes for a "kernels" package
    subprocess.run(
        [sys.executable, str(script), str(base_fp32), str(adapter), str(out)],
        check=True, cwd=tmp_path, capture_output=True, timeout=300,
    )  # fmt: skip
    ours_path = tmp_path / "ours.safetensors"
    result = run_cli(
        "merge", "--source-model", base_fp32, "--lora-model", adapter, "--output", ours_path,
        "--output-dtype", "fp32", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    theirs, ours, base = load_file(str(out)), load_file(str(ours_path)), load_file(str(base_fp32))
    for key in (f"{Q}.weight", f"{F}.weight"):
        assert not torch.equal(ours[key], base[key])
        assert torch.equal(theirs[key], ours[key]), key  # bit for bit (scale 1, fp32)
    for key in (f"{Q}.bias", f"{F}.bias"):
        assert torch.equal(theirs[key], base[key])


def test_several_caps_make_one_adapter_directory_each(pair_files, tmp_path):
    extract(pair_files, tmp_path / "adapter", "--key-style", "peft", rank="2,4")
    for cap in (2, 4):
        folder = tmp_path / f"adapter-r{cap}"
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
        assert json.load(open(folder / "adapter_config.json"))["r"] == cap
        assert weights_of(folder)[f"base_model.model.{Q}.lora_A.weight"].shape == (cap, 128)
