"""The key-style name table: exact names per style, what each cannot hold, and refusals."""

import pytest

from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.lora.styles import KEY_STYLES, check_output, diff_pair, key_style

W = "blocks.0.attn.q.weight"


@pytest.mark.parametrize(
    "style, names",
    [
        (
            "lightx2v",
            {
                "up": "diffusion_model.blocks.0.attn.q.lora_up.weight",
                "down": "diffusion_model.blocks.0.attn.q.lora_down.weight",
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


def test_lightx2v_writes_an_alpha_key_only_where_alpha_is_not_the_rank():
    assert KEY_STYLES["lightx2v"].lowrank_names(W, alpha_is_rank=False) == {
        "up": "diffusion_model.blocks.0.attn.q.lora_up.weight",
        "down": "diffusion_model.blocks.0.attn.q.lora_down.weight",
        "alpha": "diffusion_model.blocks.0.attn.q.alpha",
    }
    assert "alpha" in KEY_STYLES["kohya"].lowrank_names(W, alpha_is_rank=True)


@pytest.mark.parametrize("style", list(KEY_STYLES))
def test_a_2d_weight_diff_is_an_exact_pair_in_every_style_unless_diffs_are_kept(style):
    kind = KEY_STYLES[style]
    assert kind.diff_outputs(W, (8, 4)) == kind.lowrank_names(W)
    kept = kind.diff_outputs(W, (8, 4), keep_diff=True)
    assert kept == ({"diff": kind.diff_name(W)} if kind.diffs else kind.lowrank_names(W))
    # not 2-D, or not a weight: a diff where the style holds one, else nothing
    assert kind.diff_outputs("blocks.0.attn.q.bias", (8,)) == (
        {"diff": kind.diff_name("blocks.0.attn.q.bias")} if kind.diffs else None
    )


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((8, 4), (4, "up", "down")), ((4, 8), (4, "down", "up")), ((5, 5), (5, "up", "down"))],
)
def test_the_exact_pair_of_a_diff_puts_it_in_the_factor_of_its_shape(shape, expected):
    assert diff_pair(shape) == expected


WAN_ORIGINAL = ["blocks.0.self_attn.q.weight", "blocks.0.ffn.0.weight", "head.head.weight"]
WAN_DIFFUSERS = ["blocks.0.attn1.to_q.weight", "blocks.0.ffn.net.0.proj.weight", "proj_out.weight"]


def test_a_wan_model_is_written_in_each_styles_layout():
    lightx2v = KEY_STYLES["lightx2v"].for_model(WAN_DIFFUSERS)
    assert lightx2v.lowrank_names("blocks.0.attn1.to_q.weight")["up"] == (
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight"
    )
    assert lightx2v.diff_name("scale_shift_table") == "diffusion_model.head.diff_m"
    diffusers = KEY_STYLES["diffusers"].for_model(WAN_ORIGINAL)
    assert diffusers.lowrank_names("head.head.weight")["up"] == "transformer.proj_out.lora_B.weight"
    # the peft style keeps the model's own names; a style in the model's layout renames nothing
    assert KEY_STYLES["peft"].for_model(WAN_ORIGINAL).lowrank_names("head.head.weight")["up"] == (
        "base_model.model.head.head.lora_B.weight"
    )
    same = KEY_STYLES["lightx2v"].for_model(WAN_ORIGINAL)
    assert (
        same.lowrank_names("head.head.weight")["up"] == "diffusion_model.head.head.lora_up.weight"
    )


def test_a_wrapped_wan_model_is_relaid_without_its_wrappers():
    wrapped = ["model.diffusion_model." + name for name in WAN_ORIGINAL]
    diffusers = KEY_STYLES["diffusers"].for_model(wrapped)
    assert diffusers.lowrank_names("model.diffusion_model.blocks.0.self_attn.q.weight") == {
        "up": "transformer.blocks.0.attn1.to_q.lora_B.weight",
        "down": "transformer.blocks.0.attn1.to_q.lora_A.weight",
    }


def test_a_model_that_only_shares_generic_names_is_not_renamed():
    toy = KEY_STYLES["diffusers"].for_model(["blocks.0.ffn.0.weight", "blocks.0.modulation"])
    assert (
        toy.lowrank_names("blocks.0.ffn.0.weight")["up"]
        == "transformer.blocks.0.ffn.0.lora_B.weight"
    )


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
