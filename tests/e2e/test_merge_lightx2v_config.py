"""A whole LightX2V inference config passed to ``merge --config``, shaped as the files in its
configs/ (distill/wan22/wan_moe_i2v_distill_with_lora.json; minimax_h3's entries carry
``alpha``): the LoRA fields read, the others named once, ``--config-name`` choosing a Wan2.2 MoE
model's entries, an entry's ``alpha`` applied as LightX2V applies it."""

import json

import torch
from safetensors.torch import load_file

from loraforge import LoraSet
from loraforge.pipeline.lora.config import LoraSpec
from tests.helpers.checkpoints import Q, lora_pair, make_base, save_lora
from tests.helpers.cli import run_cli
from tests.helpers.reference import assert_close, lowrank_product, read_report

INFERENCE_FIELDS = {
    "infer_steps": 4,
    "target_video_length": 81,
    "text_len": 512,
    "target_height": 720,
    "target_width": 1280,
    "self_attn_1_type": "sage_attn2",
    "sample_guide_scale": [3.5, 3.5],
    "sample_shift": 5.0,
    "enable_cfg": False,
    "cpu_offload": False,
    "boundary_step_index": 2,
    "denoising_step_list": [1000, 750, 500, 250],
}
NOT_USED = ", ".join(sorted(INFERENCE_FIELDS))


def moe_config(tmp_path) -> str:
    (tmp_path / "loras").mkdir()
    for name, seed in (("high", 1), ("low", 7)):
        pair = lora_pair(f"diffusion_model.{Q}", ".lora_up.weight", ".lora_down.weight", seed=seed)
        save_lora(tmp_path / "loras", f"{name}.safetensors", pair)
    config = {
        **INFERENCE_FIELDS,
        "lora_configs": [
            {"name": "high_noise_model", "path": "loras/high.safetensors", "strength": 1.0},
            {"name": "low_noise_model", "path": "loras/low.safetensors", "strength": 0.5},
        ],
    }
    path = tmp_path / "wan_moe_i2v_distill_with_lora.json"
    path.write_text(json.dumps(config, indent=4))
    return str(path)


def merge_cli(base, output, *args):
    return run_cli("merge", "--source-model", base, "--output", output, "--device", "cpu", *args)


def test_moe_config_merges_the_chosen_model_and_names_the_rest_once(tmp_path):
    base, _ = make_base(tmp_path)
    config = moe_config(tmp_path)
    out = str(tmp_path / "low.safetensors")
    result = merge_cli(base, out, "--config", config, "--config-name", "low_noise_model", "--quiet")
    assert result.exit_code == 0, result.output
    note = f"note: {config}: fields not used by loraforge merge (it reads the LoRA fields): "
    assert result.stderr.splitlines() == [note + NOT_USED]
    same = str(tmp_path / "same.safetensors")
    low = str(tmp_path / "loras" / "low.safetensors")
    result = merge_cli(base, same, "--lora-model", low, "--strength", "0.5", "--quiet")
    assert result.exit_code == 0, result.output
    assert open(out, "rb").read() == open(same, "rb").read()
    summary = read_report(str(tmp_path / "low.report.json"))["summary"]
    assert summary["config"] == {
        "path": config,
        "name": "low_noise_model",
        "not_used": sorted(INFERENCE_FIELDS),
    }
    assert summary["loras"][0]["path"] == low
    result = merge_cli(base, str(tmp_path / "j.safetensors"), "--config", config, "--config-name",
                       "high_noise_model", "--json")  # fmt: skip
    notes = [json.loads(line) for line in result.stdout.splitlines() if '"note"' in line]
    assert [n["message"] for n in notes] == [note.removeprefix("note: ") + NOT_USED]


def test_named_entries_need_a_name(tmp_path):
    base, _ = make_base(tmp_path)
    config = moe_config(tmp_path)
    out = str(tmp_path / "m.safetensors")
    result = merge_cli(base, out, "--config", config)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {config}: the LoRAs are named (high_noise_model, low_noise_model): choose one "
        "with --config-name NAME\n"
    )
    result = merge_cli(base, out, "--config", config, "--config-name", "mid_noise_model")
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {config}: no lora_configs entry is named 'mid_noise_model'; names: "
        "high_noise_model, low_noise_model\n"
    )
    low = str(tmp_path / "loras" / "low.safetensors")
    result = merge_cli(base, out, "--lora-model", low, "--config-name", "low_noise_model")
    assert result.exit_code == 2
    assert result.stderr == (
        "error: --config-name chooses entries of a --config file; none given\n"
    )
    assert not (tmp_path / "m.safetensors").exists()


def test_entry_alpha_scales_modules_without_their_own(tmp_path):
    """As MiniMax-H3's loader: alpha / rank where the file has no ``.alpha`` for the module,
    the file's own alpha where it has one."""
    base_path, base = make_base(tmp_path)
    tensors = {
        **lora_pair(Q, ".lora_up.weight", ".lora_down.weight", rank=4),
        **lora_pair("blocks.0.attn.k", ".lora_up.weight", ".lora_down.weight", rank=4, seed=3),
        "blocks.0.attn.k.alpha": torch.tensor(8.0),
    }
    save_lora(tmp_path, "turbo.safetensors", tensors)
    config = tmp_path / "minimax_h3_t2av_dmd_lora_4step.json"
    entry = {"path": "turbo.safetensors", "strength": 0.5, "alpha": 2}
    config.write_text(json.dumps({"infer_steps": 5, "lora_configs": [entry]}))
    out = str(tmp_path / "out.safetensors")
    result = merge_cli(base_path, out, "--config", str(config), "--output-dtype", "fp32", "--quiet")
    assert result.exit_code == 0, result.output
    merged = load_file(out)
    q_delta = lowrank_product(tensors[f"{Q}.lora_up.weight"], tensors[f"{Q}.lora_down.weight"])
    k_up, k_down = (
        tensors["blocks.0.attn.k.lora_up.weight"],
        tensors["blocks.0.attn.k.lora_down.weight"],
    )
    assert_close(merged[f"{Q}.weight"], base[f"{Q}.weight"].double() + 0.5 * (2 / 4) * q_delta)
    expected_k = base["blocks.0.attn.k.weight"].double() + 0.5 * (8 / 4) * lowrank_product(
        k_up, k_down
    )
    assert_close(merged["blocks.0.attn.k.weight"], expected_k)


def test_python_api_chooses_by_name(tmp_path):
    config = moe_config(tmp_path)
    loras = LoraSet.from_config(config, name="high_noise_model")
    assert loras.specs == (LoraSpec(str(tmp_path / "loras" / "high.safetensors"), 1.0),)
