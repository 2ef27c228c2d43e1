"""A LightX2V inference config read into settings: the fields that change the result, typed and
checked with one-line refusals, the other fields named as ignored."""

import json

import pytest

from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.lora.config import LoraSpec
from loraforge.pipeline.runtime.models import MODEL_CLASSES
from loraforge.pipeline.runtime.settings import Settings, read_settings

WAN21, DISTILL = MODEL_CLASSES["wan2.1"], MODEL_CLASSES["wan2.1_distill"]
MOE, MOE_DISTILL = MODEL_CLASSES["wan2.2_moe"], MODEL_CLASSES["wan2.2_moe_distill"]

# LightX2V's configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json at f8aee98, verbatim
LIGHTX2V_T2V_DISTILL_LORA = {
    "infer_steps": 4,
    "target_video_length": 81,
    "text_len": 512,
    "target_height": 480,
    "target_width": 832,
    "self_attn_1_type": "flash_attn3",
    "cross_attn_1_type": "flash_attn3",
    "cross_attn_2_type": "flash_attn3",
    "sample_guide_scale": 6,
    "sample_shift": 5,
    "enable_cfg": False,
    "cpu_offload": False,
    "offload_granularity": "model",
    "denoising_step_list": [1000, 750, 500, 250],
    "lora_configs": [
        {
            "path": "lightx2v/Wan2.1-Distill-Loras/"
            "wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors",
            "strength": 1.0,
        }
    ],
}


def write(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_lightx2v_distill_lora_config(tmp_path):
    path = write(tmp_path, LIGHTX2V_T2V_DISTILL_LORA)
    settings = read_settings(path, DISTILL)
    lora = str(tmp_path / LIGHTX2V_T2V_DISTILL_LORA["lora_configs"][0]["path"])
    assert settings == Settings(
        infer_steps=4,
        target_video_length=81,
        target_height=480,
        target_width=832,
        sample_guide_scale=(6.0,),
        sample_shift=5.0,
        enable_cfg=False,
        denoising_step_list=(1000.0, 750.0, 500.0, 250.0),
        text_len=512,
        loras=((None, LoraSpec(lora, 1.0)),),
    )
    assert settings.steps == 4
    assert settings.ignored == (
        "cpu_offload",
        "cross_attn_1_type",
        "cross_attn_2_type",
        "offload_granularity",
        "self_attn_1_type",
    )
    # the non-distill runner does not read the distill list: named as ignored, as LightX2V's
    plain = read_settings(path, WAN21)
    assert plain.denoising_step_list is None and "denoising_step_list" in plain.ignored
    assert plain.steps == 4


def test_moe_fields_and_defaults(tmp_path):
    data = {
        "sample_guide_scale": [4.0, 3.0],
        "boundary": 0.875,
        "high_noise_original_ckpt": "high.safetensors",
        "dit_original_ckpt": "x.safetensors",
    }
    settings = read_settings(write(tmp_path, data), MOE)
    assert settings.sample_guide_scale == (4.0, 3.0) and settings.boundary == 0.875
    assert settings.originals == (("transformer", str(tmp_path / "high.safetensors")),)
    assert settings.ignored == ("dit_original_ckpt",)
    assert (settings.infer_steps, settings.target_video_length, settings.enable_cfg) == (
        50,
        81,
        False,
    )
    assert read_settings(None, WAN21) == Settings()


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        (WAN21, {"infer_steps": 0}, "'infer_steps' must be an integer >= 1, got 0"),
        (WAN21, {"infer_steps": True}, "'infer_steps' must be an integer >= 1, got True"),
        (WAN21, {"sample_shift": -1}, "'sample_shift' must be > 0, got -1"),
        (WAN21, {"enable_cfg": "yes"}, "'enable_cfg' must be true or false, got 'yes'"),
        (
            WAN21,
            {"sample_guide_scale": [4, 3]},
            "'sample_guide_scale' is a list (one per Wan 2.2 expert); --model_cls wan2.1 takes "
            "one number",
        ),
        (
            MOE,
            {"sample_guide_scale": [4, 3, 2]},
            "'sample_guide_scale' must be a number or [high, low], got [4, 3, 2]",
        ),
        (
            DISTILL,
            {"infer_steps": 4},
            "--model_cls wan2.1_distill runs the step-distill schedule: the config needs "
            "'denoising_step_list' (e.g. [1000, 750, 500, 250])",
        ),
        (
            DISTILL,
            {"denoising_step_list": [1000, 500, 750]},
            "'denoising_step_list' must decrease within (0, 1000], got [1000, 500, 750]",
        ),
        (MOE, {"boundary": 1.5}, "'boundary' must be between 0 and 1, got 1.5"),
        (  # valid JSON, past any float: a usage error, not an OverflowError
            WAN21,
            {"sample_shift": 10**400},
            "'sample_shift' must be a finite number, got 1000000000000000000000000000000000000...",
        ),
        (
            WAN21,
            {"lora_configs": [{"path": "a", "strenght": 1}]},
            "lora_configs[0]: unknown field(s) strenght; valid: name, path, strength, alpha",
        ),
    ],
)
def test_refusals_name_the_file_and_field(tmp_path, model, data, message):
    path = write(tmp_path, data)
    with pytest.raises(UsageError) as caught:
        read_settings(path, model)
    assert str(caught.value) == f"{path}: {message}"


def test_shape_checks_and_overrides():
    settings = Settings(target_video_length=6)
    with pytest.raises(UsageError) as caught:
        settings.check_frames(4, "c.json")
    assert (
        str(caught.value) == "c.json: 'target_video_length' must be 4k+1 frames, got 6 (use 5 or 9)"
    )
    with pytest.raises(UsageError) as caught:
        Settings(target_width=40).check_size(16, None)
    assert str(caught.value) == "'target_width' must be a multiple of 16, got 40"
    assert Settings().with_overrides(infer_steps=8).infer_steps == 8
    with pytest.raises(UsageError) as caught:
        Settings().with_overrides(infer_steps=-1)
    assert str(caught.value) == "'infer_steps' must be an integer >= 1, got -1"
