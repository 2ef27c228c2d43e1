"""A request checked before it is queued: LoRA names inside --lora_dir, finite strengths, the
image, the settings it overrides and where its result goes; each refusal names its field."""

import os
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")

from loraforge.pipeline.lora.config import LoraSpec  # noqa: E402
from loraforge.pipeline.runtime.spec import RuntimeOptions, open_spec  # noqa: E402
from loraforge.pipeline.serve.requests import BadRequest, Context, plan_request  # noqa: E402
from loraforge.pipeline.serve.schema import VideoTaskRequest  # noqa: E402


def context(
    wan_sample, tmp_path, model_cls="wan2.1", folder="model", task="t2v", config="lora_config"
):
    options = RuntimeOptions(model_cls, task, wan_sample[folder], wan_sample[config])
    spec = open_spec(options, "cpu")
    checked = []
    runtime = SimpleNamespace(
        spec=spec, loras=SimpleNamespace(check=lambda assigned, strict: checked.append(assigned))
    )
    loras = tmp_path / "loras"
    loras.mkdir(exist_ok=True)
    for name in ("style_a", "style_b"):
        if not (loras / f"{name}.safetensors").exists():
            os.symlink(wan_sample[name], loras / f"{name}.safetensors")
    base = {name: () for name in spec.model.transformers}
    return Context(runtime, base, str(loras), str(tmp_path / "out")), checked


def test_a_request_without_loras_runs_the_configs_settings(wan_sample, tmp_path):
    ctx, checked = context(wan_sample, tmp_path)
    plan = plan_request(VideoTaskRequest(task_id="t1", prompt="a cat", seed=3), ctx)
    assert plan.job.settings == ctx.runtime.spec.settings
    assert (plan.job.prompt, plan.job.seed, plan.job.image_path) == ("a cat", 3, None)
    assert plan.loras == {"transformer": ()} and plan.requested == []
    assert (plan.save_result_path, plan.output) == ("t1.mp4", str(tmp_path / "out" / "t1.mp4"))
    assert 0 <= plan_request(VideoTaskRequest(), ctx).job.seed < 2**32  # random, reported


def test_lora_name_overrides_and_ignored_fields(wan_sample, tmp_path):
    ctx, checked = context(wan_sample, tmp_path)
    request = VideoTaskRequest.model_validate(
        {
            "lora_name": "style_b.safetensors",
            "lora_strength": 0.5,
            "infer_steps": 2,
            "target_video_length": 9,
            "target_shape": [48, 64],
            "save_result_path": "sub/x",
            "use_prompt_enhancer": True,
            "image_path": "ignored.png",
        }
    )
    plan = plan_request(request, ctx)
    linked = str(tmp_path / "loras" / "style_b.safetensors")  # the operator's symlink, followed
    assert plan.loras == {"transformer": (LoraSpec(linked, 0.5),)}
    assert checked == [{"transformer": (LoraSpec(linked, 0.5),)}]  # the request's, strictly
    assert plan.requested == [{"path": "style_b.safetensors", "strength": 0.5}]
    settings = plan.job.settings
    assert (settings.infer_steps, settings.target_video_length) == (2, 9)
    assert (settings.target_height, settings.target_width) == (48, 64)
    assert plan.save_result_path == "sub/x.mp4"
    assert plan.ignored == ["use_prompt_enhancer", "image_path"]


def test_lora_configs_per_expert_under_the_configs_own(wan_sample, tmp_path):
    ctx, checked = context(
        wan_sample, tmp_path, "wan2.2_moe_distill", "model_moe", config="moe_config"
    )
    ctx = Context(
        ctx.runtime,
        {"transformer": (LoraSpec("/base", 1.0),), "transformer_2": ()},
        ctx.lora_dir,
        ctx.output_dir,
    )
    request = VideoTaskRequest.model_validate(
        {
            "lora_configs": [
                {"path": "style_a.safetensors", "name": "low_noise_model", "strength": 2},
                {"path": "style_b.safetensors"},
            ]
        }
    )
    plan = plan_request(request, ctx)
    a, b = (str(tmp_path / "loras" / f"{n}.safetensors") for n in ("style_a", "style_b"))
    assert plan.loras == {
        "transformer": (LoraSpec("/base", 1.0), LoraSpec(b, 1.0)),
        "transformer_2": (LoraSpec(a, 2.0), LoraSpec(b, 1.0)),
    }
    assert checked == [  # the request's alone: the config's were checked at start
        {"transformer": (LoraSpec(b, 1.0),), "transformer_2": (LoraSpec(a, 2.0), LoraSpec(b, 1.0))}
    ]


@pytest.mark.parametrize(
    ("body", "status", "field", "message"),
    [
        (
            {"lora_name": "../model/x.safetensors"},
            403,
            "lora_name",
            "'../model/x.safetensors' reaches outside --lora_dir",
        ),
        (
            {"lora_name": "/etc/passwd"},
            400,
            "lora_name",
            "'/etc/passwd' is not a name inside --lora_dir",
        ),
        (
            {"lora_name": "sub/../../style_a.safetensors"},
            403,
            "lora_name",
            "'sub/../../style_a.safetensors' reaches outside --lora_dir",
        ),
        (
            {"lora_name": "nope.safetensors"},
            404,
            "lora_name",
            "no LoRA 'nope.safetensors' in --lora_dir",
        ),
        (
            {"lora_name": "style_a.safetensors", "lora_configs": []},
            400,
            "lora_configs",
            "give lora_name or lora_configs, not both",
        ),
        (
            {"lora_configs": [{"path": "style_a.safetensors", "name": "high_noise_model"}]},
            400,
            "lora_configs",
            "lora_configs[0] is named 'high_noise_model', a Wan 2.2 expert; "
            "--model_cls wan2.1 has one transformer: leave 'name' out",
        ),
        (
            {"lora_configs": [{"path": "x/../../y"}]},
            403,
            "lora_configs[0].path",
            "'x/../../y' reaches outside --lora_dir",
        ),
        (
            {"target_video_length": 6},
            400,
            "target_video_length",
            "'target_video_length' must be 4k+1 frames, got 6 (use 5 or 9)",
        ),
        (
            {"target_shape": [40, 32]},
            400,
            "target_shape",
            "'target_height' must be a multiple of 16, got 40",
        ),
        ({"target_shape": [32]}, 400, "target_shape", "must be [height, width], got [32]"),
        (
            {"save_result_path": "../out.mp4"},
            403,
            "save_result_path",
            "'../out.mp4' is not a file name inside --output_dir",
        ),
        (
            {"save_result_path": "/tmp/x.mp4"},
            403,
            "save_result_path",
            "'/tmp/x.mp4' is not a file name inside --output_dir",
        ),
    ],
)
def test_refusals_name_the_field(wan_sample, tmp_path, body, status, field, message):
    ctx, checked = context(wan_sample, tmp_path)
    with pytest.raises(BadRequest) as caught:
        plan_request(VideoTaskRequest.model_validate(body), ctx)
    assert (caught.value.status, caught.value.field, caught.value.message) == (
        status,
        field,
        message,
    )
    assert checked == []


def test_i2v_needs_a_readable_image_and_distill_keeps_its_steps(wan_sample, tmp_path):
    ctx, _ = context(wan_sample, tmp_path, folder="model_i2v", task="i2v")
    with pytest.raises(BadRequest) as caught:
        plan_request(VideoTaskRequest(), ctx)
    assert (caught.value.field, caught.value.message) == (
        "image_path",
        "--task i2v needs an input image: give image_path",
    )
    with pytest.raises(BadRequest) as caught:
        plan_request(VideoTaskRequest(image_path=wan_sample["style_a"]), ctx)
    assert caught.value.field == "image_path" and "not a readable image" in caught.value.message
    assert (
        plan_request(VideoTaskRequest(image_path=wan_sample["image"]), ctx).job.image_path
        == (wan_sample["image"])
    )
    ctx, _ = context(wan_sample, tmp_path, "wan2.1_distill", config="distill_config")
    assert plan_request(VideoTaskRequest(infer_steps=4), ctx).job.settings.steps == 4
    with pytest.raises(BadRequest) as caught:
        plan_request(VideoTaskRequest(infer_steps=8), ctx)
    assert (caught.value.field, caught.value.message) == (
        "infer_steps",
        "--model_cls wan2.1_distill runs the 4 steps of the config's denoising_step_list; got 8",
    )
