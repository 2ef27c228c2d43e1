"""``loraforge convert`` across every key style: there and back gives the same tensors (an alpha
that went through a config comes back as fp32 with the same value), every style merges to the
same bytes as the original, and what a style cannot hold is listed, never dropped silently.
(The peft package loading an adapter: tests/e2e/test_extract_key_styles.py.)"""

from __future__ import annotations

import itertools
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from loraforge.pipeline.lora.styles import KEY_STYLES
from tests.helpers.checkpoints import make_base, rand, save_lora
from tests.helpers.cli import run_cli

STYLES = list(KEY_STYLES)
Q, K, F = "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.ffn.0"


def lowrank_lora() -> dict:
    """LightX2V names; ranks 4, 2, 4 with alpha 3 (bf16), none, 8 (fp32): scales 0.75, 1, 2."""
    return {
        f"diffusion_model.{Q}.lora_up.weight": rand(48, 4, seed=1).to(torch.bfloat16),
        f"diffusion_model.{Q}.lora_down.weight": rand(4, 32, seed=2).to(torch.bfloat16),
        f"diffusion_model.{Q}.alpha": torch.tensor(3.0, dtype=torch.bfloat16),
        f"diffusion_model.{K}.lora_up.weight": rand(48, 2, seed=3),
        f"diffusion_model.{K}.lora_down.weight": rand(2, 32, seed=4),
        f"diffusion_model.{F}.lora_up.weight": rand(64, 4, seed=5),
        f"diffusion_model.{F}.lora_down.weight": rand(4, 32, seed=6),
        f"diffusion_model.{F}.alpha": torch.tensor(8.0),
    }


DIFFS = {
    f"diffusion_model.{Q}.diff_b": rand(48, seed=7) * 1e-2,
    "diffusion_model.blocks.0.diff_m": rand(1, 6, 32, seed=8) * 1e-2,
    "diffusion_model.blocks.0.norm.diff": rand(32, seed=9) * 1e-2,
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("convert")
    base, _ = make_base(str(folder))
    lora = save_lora(str(folder), "lora.safetensors", lowrank_lora())
    full = save_lora(str(folder), "full.safetensors", {**lowrank_lora(), **DIFFS})
    return folder, base, lora, full


def convert(src, out, style, base) -> str:
    result = run_cli("convert", src, out, "--to", style, "--base", base, "--quiet")
    assert result.exit_code == 0, result.output
    return out if style == "peft" else out + ".safetensors"


def tensors(path: str) -> dict:
    file = os.path.join(path, "adapter_model.safetensors") if os.path.isdir(path) else path
    return load_file(file)


def merged(base, lora, out) -> dict:
    result = run_cli(
        "merge", "--source-model", base, "--lora-model", lora, "--output", out,
        "--output-dtype", "fp32", "--quiet", "--no-resume",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return load_file(out)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(
            a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)
        )
        for k in a
    )  # fmt: skip


def same_but_alpha_dtype(a: dict, b: dict) -> bool:
    """``same``, except that an alpha that went through a config comes back in fp32 holding
    the same value (one copied from key to key keeps its dtype)."""
    alphas = [k for k in a if k.endswith(".alpha")]
    rest_a = {k: v for k, v in a.items() if k not in alphas}
    rest_b = {k: v for k, v in b.items() if k not in alphas}
    return same(rest_a, rest_b) and all(
        k in b and b[k].dtype in (a[k].dtype, torch.float32) and a[k].item() == b[k].item()
        for k in alphas
    )


@pytest.fixture(scope="module")
def converted(setup) -> dict:
    folder, base, lora, _full = setup
    return {s: convert(lora, str(folder / f"from_orig_{s}"), s, base) for s in STYLES}


@pytest.mark.parametrize("a, b", list(itertools.permutations(STYLES, 2)))
def test_there_and_back_gives_the_same_tensors(setup, converted, a, b):
    folder, base, _lora, _full = setup
    there = convert(converted[a], str(folder / f"{a}_to_{b}"), b, base)
    back = convert(there, str(folder / f"{a}_to_{b}_to_{a}"), a, base)
    assert same_but_alpha_dtype(tensors(converted[a]), tensors(back))
    if a == "peft":
        config = json.load(open(os.path.join(back, "adapter_config.json")))
        assert config == json.load(open(os.path.join(converted[a], "adapter_config.json")))


def test_every_style_merges_to_the_bytes_of_the_original(setup, converted):
    folder, base, lora, _full = setup
    reference = merged(base, lora, str(folder / "merged_orig.safetensors"))
    scaled = reference[f"{Q}.weight"] != load_file(base)[f"{Q}.weight"]
    assert bool(scaled.any())
    for style, path in converted.items():
        assert same(merged(base, path, str(folder / f"merged_{style}.safetensors")), reference)


def test_names_and_where_alpha_lives(converted):
    assert sorted(tensors(converted["kohya"])) == [
        f"lora_unet_{m.replace('.', '_')}.{leaf}"
        for m in (K, Q, F)
        for leaf in ("alpha", "lora_down.weight", "lora_up.weight")
    ]
    # alphas: the source's own tensor where it had one, else the rank in fp32
    kohya = tensors(converted["kohya"])
    assert kohya["lora_unet_blocks_0_attn_q.alpha"].dtype == torch.bfloat16
    assert kohya["lora_unet_blocks_0_attn_k.alpha"].dtype == torch.float32
    assert kohya["lora_unet_blocks_0_attn_k.alpha"].item() == 2.0
    # lightx2v: an alpha key only where alpha is not the rank
    assert {k for k in tensors(converted["lightx2v"]) if k.endswith(".alpha")} == {
        f"diffusion_model.{Q}.alpha",
        f"diffusion_model.{F}.alpha",
    }
    config = json.load(open(os.path.join(converted["peft"], "adapter_config.json")))
    # the most common rank and alpha (ties: the smallest), the others by their full name,
    # escaped and anchored (PEFT matches a bare pattern as a suffix of any module's name)
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 2, [K, Q, F])
    assert config["rank_pattern"] == {r"^blocks\.0\.attn\.k": 2}
    assert config["alpha_pattern"] == {r"^blocks\.0\.attn\.q": 3, r"^blocks\.0\.ffn\.0": 8}
    assert sorted(tensors(converted["peft"])) == [
        f"base_model.model.{m}.lora_{ab}.weight" for m in (K, Q, F) for ab in "AB"
    ]
    with safe_open(converted["diffusers"], "pt") as f:
        header = json.loads(f.metadata()["lora_adapter_metadata"])
    assert {k: v for k, v in header.items()} == {f"transformer.{k}": v for k, v in config.items()}


def test_full_diffs_survive_lightx2v_and_kohya(setup):
    folder, base, _lora, full = setup
    first = convert(full, str(folder / "full_lightx2v"), "lightx2v", base)
    assert same(tensors(first), tensors(full))  # K's alpha is its rank: still no key
    kohya = convert(first, str(folder / "full_kohya"), "kohya", base)
    assert {"lora_unet_blocks_0_attn_q.diff_b", "lora_unet_blocks_0.diff_m",
            "lora_unet_blocks_0_norm.diff"} <= set(tensors(kohya))  # fmt: skip
    back = convert(kohya, str(folder / "full_back"), "lightx2v", base)
    assert same(tensors(back), tensors(first))
    reference = merged(base, full, str(folder / "merged_full.safetensors"))
    assert same(merged(base, kohya, str(folder / "merged_full_kohya.safetensors")), reference)


def test_what_peft_cannot_hold_is_listed(setup):
    folder, base, _lora, full = setup
    result = run_cli("convert", full, folder / "full_peft", "--to", "peft", "--base", base)
    assert result.exit_code == 0, result.output
    assert "3 LoRA keys not written (listed in the report)" in result.output
    report = json.load(open(folder / "full_peft.report.json"))
    assert sorted(report["summary"]["left_out"]) == sorted(DIFFS)
    assert all(
        "holds only lora_A/lora_B pairs" in r for r in report["summary"]["left_out"].values()
    )


def test_kohya_names_need_the_base(setup, converted):
    folder, _base, _lora, _full = setup
    result = run_cli("convert", converted["kohya"], folder / "nobase", "--to", "peft")
    assert result.exit_code == 2
    assert "kohya names ('lora_unet_blocks_0_attn_k.alpha') map back to module names" in (
        result.output
    )
    assert "(pass --base MODEL)" in result.output
    assert not (folder / "nobase").exists()  # a refused run makes no directory


def test_without_base_names_come_from_the_lora(setup, converted):
    folder, _base, lora, _full = setup
    out = run_cli("convert", lora, folder / "own_peft", "--to", "peft", "--quiet")
    assert out.exit_code == 0, out.output
    assert same(tensors(str(folder / "own_peft")), tensors(converted["peft"]))


def test_converting_an_adapter_onto_itself_is_refused(setup, converted):
    folder, base, _lora, _full = setup
    adapter = converted["peft"]
    before = {n: open(os.path.join(adapter, n), "rb").read() for n in os.listdir(adapter)}
    result = run_cli("convert", adapter, adapter, "--to", "peft", "--base", base)
    assert result.exit_code == 2
    assert "OUT would overwrite the input IN" in result.output  # named as the CLI names them
    assert {n: open(os.path.join(adapter, n), "rb").read() for n in os.listdir(adapter)} == before


def test_a_nonfinite_alpha_is_one_line_with_a_hint_convert_can_follow(tmp_path):
    tensors = {**lowrank_lora(), f"diffusion_model.{F}.alpha": torch.tensor(float("nan"))}
    lora = save_lora(str(tmp_path), "nan.safetensors", tensors)
    result = run_cli("convert", lora, tmp_path / "out", "--to", "kohya")
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {lora}: tensor 'diffusion_model.{F}.alpha': alpha is nan (fix the LoRA; merge "
        "and resize read it anyway with --allow-nonfinite)\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["nan.safetensors"]


def test_a_sharded_peft_or_diffusers_output_is_refused_naming_to(setup):
    folder, _base, lora, _full = setup
    for style in ("peft", "diffusers"):
        result = run_cli(
            "convert", lora, folder / "sharded", "--to", style, "--max-shard-size", "1KB"
        )
        assert result.exit_code == 2
        assert result.stderr == (
            f"error: --to {style}: its loaders read one file, so it is never sharded "
            "(drop --max-shard-size)\n"
        )
    assert not any(name.startswith("sharded") for name in os.listdir(folder))


def test_in_is_resolved_and_a_missing_in_names_the_argument(setup, converted, monkeypatch):
    folder, _base, _lora, _full = setup
    monkeypatch.chdir(folder)
    adapter = os.path.basename(converted["peft"])
    result = run_cli("convert", adapter, f"{adapter}/adapter_config.json", "--to", "kohya")
    assert result.exit_code == 2
    config = f"{folder}/{adapter}/adapter_config.json"
    assert result.stderr == (
        f"error: {config}: OUT would overwrite the input IN {config} (choose another OUT)\n"
    )
    result = run_cli("convert", "gone.safetensors", "out", "--to", "kohya")
    assert result.exit_code == 1
    assert result.stderr == f"error: {folder}/gone.safetensors: LoRA not found (check IN)\n"
    assert run_cli("convert", adapter, "rel", "--to", "kohya", "--quiet").exit_code == 0
    report = json.load(open(folder / "rel.report.json"))
    assert report["inputs"] == {
        "lora": f"{folder}/{adapter}",
        "file": f"{folder}/{adapter}/adapter_model.safetensors",
        "base": None,
    }
