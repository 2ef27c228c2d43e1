"""Which transformer each LoRA patches (Wan 2.2 MoE names), and how the command line's LoRAs
combine with the config's: --lora_path replaces them."""

import json

import pytest

from loraforge.pipeline.errors import CheckpointNotFound, UsageError
from loraforge.pipeline.lora.config import LoraSpec
from loraforge.pipeline.runtime.loras import assign
from loraforge.pipeline.runtime.models import MODEL_CLASSES
from loraforge.pipeline.runtime.spec import RuntimeOptions, lora_specs, open_spec

A, B = LoraSpec("/a.safetensors", 0.5), LoraSpec("/b.safetensors", 1.0)


def test_moe_entries_go_to_their_expert_and_unnamed_ones_to_both():
    moe = MODEL_CLASSES["wan2.2_moe_distill"]
    named = [("low_noise_model", A), (None, B), ("high_noise_model", A)]
    assert assign(moe, named, "c.json", "lora_configs") == {
        "transformer": (B, A),
        "transformer_2": (A, B),
    }
    assert assign(MODEL_CLASSES["wan2.1"], [(None, A)], None, "x") == {"transformer": (A,)}


@pytest.mark.parametrize(
    ("model", "named", "message"),
    [
        (
            "wan2.1",
            [(None, A), ("high_noise_model", B)],
            "c.json: lora_configs[1] is named 'high_noise_model', a Wan 2.2 expert; --model_cls "
            "wan2.1 has one transformer: leave 'name' out",
        ),
        (
            "wan2.2_moe",
            [("mid_noise_model", A)],
            "c.json: lora_configs[0]: unknown name 'mid_noise_model'; valid: high_noise_model, "
            "low_noise_model (or no name: both transformers)",
        ),
    ],
)
def test_names_the_model_does_not_have_are_refused(model, named, message):
    with pytest.raises(UsageError) as caught:
        assign(MODEL_CLASSES[model], named, "c.json", "lora_configs")
    assert str(caught.value) == message


def spec_with_config(wan_sample, tmp_path, model="wan2.1", folder="model"):
    config = tmp_path / "c.json"
    config.write_text(
        json.dumps(
            {
                "target_video_length": 5,
                "target_height": 32,
                "target_width": 32,
                "lora_configs": [{"path": wan_sample["style_a"], "strength": 0.7}],
            }
        )
    )
    options = RuntimeOptions(model, "t2v", wan_sample[folder], str(config))
    return open_spec(options, "cpu")


def test_lora_path_replaces_the_configs_loras(wan_sample, tmp_path):
    spec = spec_with_config(wan_sample, tmp_path)
    a, b = wan_sample["style_a"], wan_sample["style_b"]
    assert lora_specs(spec, [], []) == ({"transformer": (LoraSpec(a, 0.7),)}, None)
    assigned, note = lora_specs(spec, [b, a], [0.5])
    assert assigned == {"transformer": (LoraSpec(b, 0.5), LoraSpec(a, 0.5))}
    assert note == f"--lora_path replaces the 1 LoRA(s) of {tmp_path / 'c.json'}"
    assert lora_specs(spec, [b, a], [0.5, 2])[0] == {
        "transformer": (LoraSpec(b, 0.5), LoraSpec(a, 2.0))
    }


@pytest.mark.parametrize(
    ("paths", "strengths", "error", "message"),
    [
        (
            ["A", "B"],
            [1.0, 2.0, 3.0],
            UsageError,
            "3 --lora_strength values for 2 --lora_path "
            "(give one strength for all, or one per --lora_path in the same order)",
        ),
        ([], [0.5], UsageError, "--lora_strength without --lora_path"),
        (
            ["/nowhere/x.safetensors"],
            [],
            CheckpointNotFound,
            "LoRA not found: /nowhere/x.safetensors (check --lora_path)",
        ),
    ],
)
def test_lora_path_refusals(wan_sample, tmp_path, paths, strengths, error, message):
    spec = spec_with_config(wan_sample, tmp_path)
    paths = [wan_sample["style_a"] if p in "AB" else p for p in paths]
    with pytest.raises(error) as caught:
        lora_specs(spec, paths, strengths)
    assert str(caught.value) == message


def test_check_headers_refuses_before_loading_as_apply_would(wan_sample, tmp_path):
    """From the checkpoint's headers: a LoRA that patches nothing, and one whose strength ×
    scale leaves float32's range."""
    import torch
    from safetensors.torch import save_file

    from loraforge.pipeline.errors import LoraMismatch
    from loraforge.pipeline.runtime.loras import check_headers

    spec = open_spec(RuntimeOptions("wan2.1", "t2v", wan_sample["model"]), "cpu")
    foreign, loud = str(tmp_path / "foreign.safetensors"), str(tmp_path / "loud.safetensors")
    save_file(
        {
            "diffusion_model.other.lora_down.weight": torch.ones(2, 3),
            "diffusion_model.other.lora_up.weight": torch.ones(3, 2),
        },
        foreign,
    )
    q = "diffusion_model.blocks.0.self_attn.q"
    save_file(
        {
            f"{q}.lora_down.weight": torch.ones(2, 32),
            f"{q}.lora_up.weight": torch.ones(32, 2),
            f"{q}.alpha": torch.tensor(1e10),
        },
        loud,
    )
    check_headers(spec.checkpoints, {"transformer": (LoraSpec(loud, 1.0),)})
    with pytest.raises(LoraMismatch) as caught:
        check_headers(
            spec.checkpoints,
            {"transformer": (LoraSpec(wan_sample["style_a"]), LoraSpec(foreign))},
        )
    assert str(caught.value) == (
        f"{foreign}: none of its 2 keys patches the base, e.g. "
        "'diffusion_model.other.lora_down.weight': targets no base tensor (is this LoRA for "
        "another model?)"
    )
    with pytest.raises(UsageError) as caught:
        check_headers(spec.checkpoints, {"transformer": (LoraSpec(loud, 1e30),)})
    assert str(caught.value) == (
        f"{loud}: tensor '{q}.lora_up.weight': strength 1e+30 × scale 5e+09 = 5e+39 is outside "
        "float32's range (±3.4e+38), in which LoRAs are applied (lower the strength (or the "
        "alpha))"
    )
