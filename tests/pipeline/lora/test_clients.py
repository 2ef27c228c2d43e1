"""The client rules as facts. ComfyUI and LightX2V cannot be installed here: each case is a
fact read from (and, at the commits cited, run against) their loaders, so a change of rule
must change a cited fact. diffusers' and peft's rules are also checked against the installed
clients in tests/e2e/test_clients.py.

- ComfyUI v0.3.64 (Comfy-Org/ComfyUI a125cd8): ``comfy/lora.py::model_lora_keys_unet`` (no Wan
  branch: ``diffusion_model.<module>`` and ``lora_unet_<module_>`` for ``.weight`` tensors, the
  key itself for others), ``comfy/lora.py::load_lora`` (pairs in seven spellings, ``.alpha``,
  ``.diff`` → weight, ``.diff_b`` → bias, anything else "lora key not loaded"),
  ``comfy/model_patcher.py::_load_list`` (parameters of modules with children are skipped).
- LightX2V (ModelTC/LightX2V f8aee98): ``lightx2v/utils/lora_loader.py::LoRALoader``
  (``_get_model_key`` strips the first of ``diffusion_model.``/``model.``/``unet.``; 2-D pairs;
  ``.diff``/``.diff_b``/``.diff_m`` onto weight/bias/modulation)."""

from __future__ import annotations

import pytest

from loraforge.pipeline.lora.clients import LoraFile, client_loadings, judges

PAIR = {"lora_up.weight": (32, 2), "lora_down.weight": (2, 32)}
Q = "diffusion_model.blocks.0.self_attn.q"


def pair(stem: str, up: str = "lora_up.weight", down: str = "lora_down.weight") -> dict:
    return {f"{stem}.{up}": (32, 2), f"{stem}.{down}": (2, 32)}


def loading(shapes: dict, client: str, peft_config: bool = False):
    return client_loadings(LoraFile.from_shapes(shapes, peft_config))[client]


# ---- ComfyUI -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shapes", "applied", "not_applied"),
    [
        # the generic and the kohya names of a .weight tensor, in every pair spelling
        (pair(Q), {Q}, {}),
        (pair(Q, "lora_B.weight", "lora_A.weight"), {Q}, {}),
        (pair("lora_unet_blocks_0_self_attn_q"), {"lora_unet_blocks_0_self_attn_q"}, {}),
        # .diff onto the weight (norms included), .diff_b onto the bias
        (
            {
                "diffusion_model.blocks.0.norm3.diff": (32,),
                "diffusion_model.head.head.diff_b": (16,),
            },
            {"diffusion_model.blocks.0.norm3.diff", "diffusion_model.head.head.diff_b"},
            {},
        ),
        # no .diff_m in ComfyUI: "lora key not loaded"
        (
            {"diffusion_model.blocks.0.diff_m": (1, 6, 32)},
            set(),
            {"diffusion_model.blocks.0.diff_m": "ComfyUI reads no .diff_m ('lora key not loaded')"},
        ),
        # consumed, but the patcher never writes a parameter of a module with children
        (
            {"diffusion_model.blocks.0.modulation.diff": (1, 6, 32)},
            set(),
            {
                "diffusion_model.blocks.0.modulation.diff": "ComfyUI never patches Wan's "
                "modulation (a parameter of a module with children)"
            },
        ),
        # diffusers' and PEFT's prefixes are not mapped for Wan
        (
            pair("transformer.blocks.0.attn1.to_q", "lora_B.weight", "lora_A.weight"),
            set(),
            {
                "transformer.blocks.0.attn1.to_q": "ComfyUI maps Wan LoRA keys as "
                "diffusion_model.<name> or lora_unet_<name> only"
            },
        ),
        # diffusers' module names under diffusion_model. match no weight of Wan's model
        (
            pair("diffusion_model.blocks.0.attn1.to_q"),
            set(),
            {
                "diffusion_model.blocks.0.attn1.to_q": "diffusers' module names: ComfyUI loads "
                "Wan in its original naming"
            },
        ),
    ],
)
def test_comfyui_facts(shapes, applied, not_applied):
    result = loading(shapes, "comfyui")
    assert result.refused is None
    assert set(result.applied) == applied
    assert result.not_applied == not_applied


# ---- LightX2V ------------------------------------------------------------------------------


UNREAD = "LightX2V reads Wan's original names, bare or under diffusion_model."
DIFFUSERS_NAMES = "diffusers' module names: LightX2V loads Wan in its original naming"


def test_lightx2v_applies_every_diff_kind_and_pair_spelling_under_its_prefixes():
    shapes = {
        **pair("diffusion_model.blocks.0.self_attn.q"),
        **pair("model.blocks.0.self_attn.k", "lora_B.weight", "lora_A.weight"),
        **pair("blocks.0.self_attn.v"),  # bare names are the model's own
        "diffusion_model.blocks.0.diff_m": (1, 6, 32),
        "diffusion_model.blocks.0.norm3.diff": (32,),
        "diffusion_model.blocks.0.ffn.0.diff_b": (64,),
    }
    result = loading(shapes, "lightx2v")
    assert (result.refused, result.not_applied, len(result.applied)) == (None, {}, 6)


@pytest.mark.parametrize(
    ("shapes", "why"),
    [
        (pair("lora_unet_blocks_0_self_attn_q"), UNREAD),
        (pair("transformer.blocks.0.self_attn.q"), UNREAD),
        (pair("diffusion_model.blocks.0.attn1.to_q"), DIFFUSERS_NAMES),
        (
            {"diffusion_model.patch_embedding.lora_up.weight": (32, 2),
             "diffusion_model.patch_embedding.lora_down.weight": (2, 4, 1, 2, 2)},
            "not a 2-D pair: LightX2V applies 2-D up/down only ('Unexpected LoRA shape')",
        ),
    ],
)  # fmt: skip
def test_lightx2v_leaves_unused(shapes, why):
    result = loading(shapes, "lightx2v")
    assert set(result.not_applied.values()) == {why} and result.applied == ()


# ---- peft and which files the rules judge ----------------------------------------------------


def test_peft_needs_its_config_and_reads_lora_a_b_under_base_model_model():
    shapes = pair("base_model.model.blocks.0.self_attn.q", "lora_B.weight", "lora_A.weight")
    assert loading(shapes, "peft").refused == (
        "not a PEFT adapter directory (no adapter_config.json)"
    )
    assert loading(shapes, "peft", peft_config=True).applied == (
        "base_model.model.blocks.0.self_attn.q",
    )
    kohya = pair("base_model.model.blocks.0.self_attn.q")  # lora_up/lora_down: not PEFT's
    assert loading(kohya, "peft", peft_config=True).applied == ()


@pytest.mark.parametrize(
    ("keys", "judged"),
    [
        (["diffusion_model.blocks.0.self_attn.q.lora_up.weight"], True),
        (["transformer.blocks.3.attn2.to_k.lora_A.weight"], True),
        (["lora_unet_blocks_0_cross_attn_o.lora_up.weight"], True),
        (["diffusion_model.blocks.0.attn.q.lora_up.weight"], False),  # not Wan's names
        (["unet.down.0.lora_up.weight"], False),
    ],
)
def test_the_rules_judge_wan_loras_only(keys, judged):
    assert judges(keys) is judged


def test_a_summary_line_counts_what_is_left_out_by_reason():
    shapes = {
        **pair("diffusion_model.blocks.0.self_attn.q"),
        "diffusion_model.blocks.0.diff_m": (1, 6, 32),
        "diffusion_model.blocks.1.diff_m": (1, 6, 32),
    }
    assert loading(shapes, "comfyui").summary() == (
        "comfyui: 1/3 applied; not: 2 × ComfyUI reads no .diff_m ('lora key not loaded')"
    )
