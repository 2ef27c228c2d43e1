"""``loraforge infer`` on the tiny random Wan sample: the video it writes, what a LoRA changes,
the base's output bit for bit without it, original-layout transformers, Wan 2.2 MoE experts,
I2V, and one-line refusals that write nothing."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from tests.helpers.cli import run_cli
from tests.helpers.tiny_wan import PROMPT, read_mp4

pytest.importorskip("diffusers")


def infer(wan_sample, out, *args, model="model", model_cls="wan2.1", config="lora_config"):
    """Run ``loraforge infer`` in this process; returns (CLI result, report or None)."""
    output = os.path.join(out, "out.mp4")
    base = ["infer", "--model_cls", model_cls, "--model_path", wan_sample[model]]
    if config:
        base += ["--config_json", wan_sample[config]]
    result = run_cli(
        *base,
        "--prompt",
        PROMPT,
        "--seed",
        "7",
        "--dtype",
        "fp32",
        "--save_result_path",
        output,
        *args,
    )
    report = os.path.join(out, "out.report.json")
    if not os.path.exists(report):
        return result, None
    with open(report) as f:
        return result, json.load(f)


def no_lora_config(wan_sample, tmp_path):
    with open(wan_sample["lora_config"]) as f:
        data = json.load(f)
    del data["lora_configs"]
    path = tmp_path / "no_lora.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def runs(wan_sample, tmp_path_factory):
    """The sample config's run (its LoRA), the same seed without a LoRA, and the runtime's
    own base output: shared by the tests below."""
    from loraforge.pipeline.runtime.generate import Job, Runtime
    from loraforge.pipeline.runtime.spec import RuntimeOptions, open_spec

    out = tmp_path_factory.mktemp("infer")
    with_lora = infer(wan_sample, str(out / "lora"), "--save_frames")
    config = no_lora_config(wan_sample, out)
    without = infer(wan_sample, str(out / "base"), "--config_json", config, config=None)
    spec = open_spec(
        RuntimeOptions("wan2.1", "t2v", wan_sample["model"], config, dtype="fp32"), "cpu"
    )
    runtime = Runtime.load(spec)
    base = runtime.generate(Job(PROMPT, "", 7, spec.settings))
    return {"lora": with_lora, "base": without, "runtime_base": base, "out": str(out)}


def test_infer_writes_the_video_frames_and_report(runs, wan_sample):
    result, report = runs["lora"]
    assert result.exit_code == 0, result.output
    out = os.path.join(runs["out"], "lora")
    assert sorted(os.listdir(out)) == ["out.mp4", "out.report.json", "out_frames"]
    video = read_mp4(os.path.join(out, "out.mp4"))
    assert video.shape == (5, 32, 32, 3)  # target_video_length 5, 32x32
    frames = sorted(os.listdir(os.path.join(out, "out_frames")))
    assert frames == [f"frame_{i:05d}.png" for i in range(5)]
    png = np.asarray(Image.open(os.path.join(out, "out_frames", "frame_00002.png")))
    assert png.shape == (32, 32, 3) and np.abs(png.astype(int) - video[2]).mean() < 8  # H.264
    summary = report["summary"]
    assert sorted(summary["phases"]) == ["decode", "denoise", "load", "loras", "write"]
    assert summary["video"] == {"frames": 5, "height": 32, "width": 32, "fps": 16}
    assert [s["step"] for s in summary["steps"]] == [0, 1, 2, 3]
    assert [s["timestep"] for s in summary["steps"]] == [999.0, 900.0, 750.0, 500.0]  # shift 3
    (lora,) = summary["loras"]
    assert (lora["path"], lora["strength"], lora["model"]) == (
        wan_sample["style_a"],
        1.0,
        "transformer",
    )
    assert (lora["patches"], lora["unmatched"]) == (12, {})
    assert summary["held_bytes"] == 0  # fp32 from fp32 files: originals re-read, not copied
    assert summary["peak_rss_bytes"] > 10**8
    assert summary["files"] == [os.path.join(out, "out.mp4"), os.path.join(out, "out_frames")]
    assert "12 tensors patched at strength 1" in result.stderr
    assert "steps" in result.stderr and "wrote " + os.path.join(out, "out.mp4") in result.stderr


def test_a_lora_changes_the_output_and_without_it_the_base_comes_back_bit_for_bit(runs):
    lora, base = runs["lora"][1]["summary"], runs["base"][1]["summary"]
    assert runs["base"][0].exit_code == 0, runs["base"][0].output
    assert lora["frames_sha256"] != base["frames_sha256"]
    assert base["frames_sha256"] == runs["runtime_base"].digest
    assert base["loras"] == []


def test_lora_path_and_strength_on_the_command_line(runs, wan_sample, tmp_path):
    """--lora_path replaces the config's LoRA: the config's own LoRA given on the command line
    at the same strength is the same run; at 0.5 (and in bf16), another, holding nothing."""
    same = infer(wan_sample, str(tmp_path / "a"), "--lora_path", wan_sample["style_a"])[1]
    half = infer(
        wan_sample,
        str(tmp_path / "b"),
        "--lora_path",
        wan_sample["style_a"],
        "--lora_strength",
        "0.5",
        "--dtype",
        "bf16",  # a bf16 run from the sample's fp32 files: originals re-read and cast
    )[1]
    expected = runs["lora"][1]["summary"]["frames_sha256"]
    assert same["summary"]["frames_sha256"] == expected
    assert half["summary"]["frames_sha256"] not in (
        expected,
        runs["base"][1]["summary"]["frames_sha256"],
    )
    assert half["summary"]["loras"][0]["strength"] == 0.5
    assert (half["summary"]["loras"][0]["patches"], half["summary"]["held_bytes"]) == (12, 0)


def test_a_transformer_in_wans_original_layout_replaces_the_folders(runs, wan_sample, tmp_path):
    """The same weights, byte for byte. The frames agree to float rounding, not bit for bit:
    CPU kernels round differently on differently aligned weights (from_pretrained's are views
    into the file at its header's offsets, ours fresh allocations)."""
    from loraforge.pipeline.runtime.generate import Job, Runtime
    from loraforge.pipeline.runtime.spec import RuntimeOptions, open_spec

    result, report = infer(
        wan_sample, str(tmp_path), "--transformer_path", wan_sample["transformer_original"]
    )
    assert result.exit_code == 0, result.output
    assert report["inputs"]["transformers"] == {"transformer": wan_sample["transformer_original"]}
    assert report["summary"]["held_bytes"] == 0  # originals re-read from the renamed file
    options = RuntimeOptions("wan2.1", "t2v", wan_sample["model"], dtype="bf16")
    folder = Runtime.load(open_spec(options, "cpu"))
    original = Runtime.load(
        open_spec(replace(options, transformer_path=wan_sample["transformer_original"]), "cpu")
    )
    assert original.digest() == folder.digest()
    job = Job(
        PROMPT,
        "",
        7,
        folder.spec.settings.with_overrides(
            infer_steps=2, target_video_length=5, target_height=32, target_width=32
        ),
    )
    a, b = folder.generate(job).frames, original.generate(job).frames
    assert np.abs(a - b).max() < 1e-2


def test_wan22_moe_distill_gives_each_expert_its_loras(wan_sample, tmp_path):
    result, report = infer(
        wan_sample,
        str(tmp_path),
        model="model_moe",
        model_cls="wan2.2_moe_distill",
        config="moe_config",
    )
    assert result.exit_code == 0, result.output
    loras = [(s["model"], os.path.basename(s["path"])) for s in report["summary"]["loras"]]
    assert loras == [
        ("transformer", "style_a.safetensors"),
        ("transformer_2", "style_b.safetensors"),
    ]
    steps = [s["timestep"] for s in report["summary"]["steps"]]
    assert steps == pytest.approx([1000.0, 937.5, 833.333, 625.0], abs=1e-3)
    assert report["summary"]["ignored_config_fields"] == []


def test_i2v_with_an_image(wan_sample, tmp_path):
    result, report = infer(
        wan_sample,
        str(tmp_path),
        "--task",
        "i2v",
        "--image_path",
        wan_sample["image"],
        model="model_i2v",
    )
    assert result.exit_code == 0, result.output
    assert report["summary"]["video"]["frames"] == 5
    assert report["inputs"]["image_path"] == wan_sample["image"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("--task", "i2v", "--model_path", "{model_i2v}"),
            "error: --task i2v needs an input image: give --image_path",
        ),
        (
            ("--model_cls", "wan2.2_moe"),
            "error: {model}: the folder holds one transformer; "
            "--model_cls wan2.2_moe runs 2 (use --model_cls wan2.2_moe(_distill) for two, "
            "wan2.1(_distill) for one)",
        ),
        (
            ("--lora_path", "{foreign}"),
            "error: {foreign}: none of its 2 keys patches the base, e.g. "
            "'diffusion_model.other.lora_down.weight': targets no base tensor (is this LoRA for "
            "another model?)",
        ),
        (
            ("--transformer_path", "{style_a}"),
            "error: {style_a}: does not fit transformer of "
            "{model}: 69 of the model's tensors missing (e.g. blocks.0.attn1.norm_k.weight); 36 "
            "tensors the model does not have (e.g. diffusion_model.blocks.0.self_attn.k.alpha) "
            "(pass the transformer this model folder was made for, in Wan's original or "
            "diffusers' naming)",
        ),
        (
            ("--config_json", "{bad_config}"),
            "error: {bad_config}: 'target_video_length' must be 4k+1 frames, got 6 (use 5 or 9)",
        ),
        (
            ("--save_result_path", "{style_a}"),
            "error: {style_a}: --save_result_path would "
            "overwrite the input LoRA {style_a} (choose another --save_result_path)",
        ),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(wan_sample, tmp_path, args, line):
    import torch
    from safetensors.torch import save_file

    foreign = str(tmp_path / "foreign.safetensors")
    save_file(
        {
            "diffusion_model.other.lora_down.weight": torch.ones(2, 3),
            "diffusion_model.other.lora_up.weight": torch.ones(3, 2),
        },
        foreign,
    )
    bad_config = str(tmp_path / "bad.json")
    with open(bad_config, "w") as f:
        json.dump({"target_video_length": 6}, f)
    names = {**wan_sample, "foreign": foreign, "bad_config": bad_config}
    args = [a.format(**names) for a in args]
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    result = infer(wan_sample, str(out), *args)[0]
    assert result.exit_code in (1, 2)
    assert result.stderr == line.format(**names) + "\n"
    assert sorted(os.listdir(tmp_path)) == before  # out/ was never made


def test_without_the_extra_one_line_says_what_to_install(monkeypatch, wan_sample, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ftfy" else find_spec(name, *a),
    )
    result = infer(wan_sample, str(tmp_path))[0]
    assert result.exit_code == 1
    assert result.stderr == (
        "error: loraforge infer needs the infer extra; missing: ftfy (pip install "
        "'loraforge[infer]', or in a checkout pip install -e '.[infer]')\n"
    )
