"""The key-style name table: exact names per style, what each cannot hold, and refusals."""

import pytest

from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.lora.styles import KEY_STYLES, check_output, key_style

W = "blocks.0.attn.q.weight"


@pytest.mark.parametrize(
    "style, names",
    [
        (
            "lightx2v",
            {
                "up": "diffusion_model.blocks.0.attn.q.lora_up.weight",
                "down": "diffusion_model.blocks.0.attn.q.lora_down.weight",
                "alpha": "diffusion_model.blocks.0.attn.q.alpha",
            },
        ),
        (
            "kohya",
            {
                "up": "lora_unet_blocks_0_attn_q.lora_up.weight",
                "down": "lora_unet_blocks_0_attn_q.lora_down.weight",
                "alpha": "lora_unet_blocks_0_attn_q.alpha",
            },
        ),
        (
            "peft",
            {
                "up": "base_model.model.blocks.0.attn.q.lora_B.weight",
                "down": "base_model.model.blocks.0.attn.q.lora_A.weight",
            },
        ),
        (
            "diffusers",
            {
                "up": "transformer.blocks.0.attn.q.lora_B.weight",
                "down": "transformer.blocks.0.attn.q.lora_A.weight",
            },
        ),
    ],
)
def test_lowrank_names(style, names):
    assert KEY_STYLES[style].lowrank_names(W) == names


@pytest.mark.parametrize(
    "key, lightx2v, kohya",
    [
        (W, "diffusion_model.blocks.0.attn.q.diff", "lora_unet_blocks_0_attn_q.diff"),
        (
            "blocks.0.attn.q.bias",
            "diffusion_model.blocks.0.attn.q.diff_b",
            "lora_unet_blocks_0_attn_q.diff_b",
        ),
        ("blocks.0.modulation", "diffusion_model.blocks.0.diff_m", "lora_unet_blocks_0.diff_m"),
        ("freqs", None, None),
        (".weight", None, None),
    ],
)  # fmt: skip
def test_diff_names(key, lightx2v, kohya):
    assert KEY_STYLES["lightx2v"].diff_name(key) == lightx2v
    assert KEY_STYLES["kohya"].diff_name(key) == kohya
    assert KEY_STYLES["peft"].diff_name(key) is None
    assert KEY_STYLES["diffusers"].diff_name(key) is None


def test_what_a_style_cannot_hold_says_why():
    assert KEY_STYLES["lightx2v"].cannot_hold("freqs") == (
        "no LightX2V name for this suffix (only .weight, .bias, .modulation)"
    )
    # said by extract, resize and convert alike: no option only one of them has
    assert KEY_STYLES["diffusers"].cannot_hold("x.bias") == (
        "the diffusers key style holds only lora_A/lora_B pairs, not a full diff (the lightx2v "
        "and kohya styles keep it; extract's --lowrank-min-params 0 factors small 2-D weights "
        "too)"
    )


def test_an_unknown_style_lists_the_valid_ones():
    with pytest.raises(UsageError, match="unknown --to 'comfy'; valid: lightx2v, kohya, peft, "):
        key_style("comfy", "--to")


@pytest.mark.parametrize("style", ["peft", "diffusers"])
def test_config_styles_are_one_safetensors_file(style):
    check_output(KEY_STYLES[style], "safetensors", None)
    with pytest.raises(UsageError, match="written as safetensors only"):
        check_output(KEY_STYLES[style], "pytorch", None)
    with pytest.raises(UsageError, match="its loaders read one file, so it is never sharded"):
        check_output(KEY_STYLES[style], "safetensors", 10**9)


@pytest.mark.parametrize("style", ["lightx2v", "kohya"])
def test_key_styles_shard_and_pickle(style):
    check_output(KEY_STYLES[style], "pytorch", None)
    check_output(KEY_STYLES[style], "safetensors", 10**9)
