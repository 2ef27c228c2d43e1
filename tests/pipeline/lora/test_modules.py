"""Grouping a LoRA by its own module names, with no base: the modules and scales ``map_lora``
would use, and every key in no module with why."""

import pytest

from loraforge.pipeline.errors import CheckpointFormatError
from loraforge.pipeline.lora.adapter_config import PeftConfig
from loraforge.pipeline.lora.keys import Unmatched, map_lora
from loraforge.pipeline.lora.modules import LoraModule, group_lora, kohya_keys, own_targets

SHAPES = {
    "diffusion_model.a.lora_up.weight": (8, 2),
    "diffusion_model.a.lora_down.weight": (2, 6),
    "diffusion_model.a.alpha": (),
    "diffusion_model.a.diff_b": (8,),
    "b.lora_B.weight": (8, 4),
    "b.lora_A.weight": (4, 3, 1, 1),
    "c.lora_up.weight": (8, 2),
    "c.lora_down.weight": (3, 6),
    "d.lora_up.weight": (8, 2),
    "e.alpha": (),
    "f.lora_up.weight": (8, 2),
    "f.lora_down.weight": (2, 6),
    "f.lora_mid.weight": (2, 2, 3, 3),
    "junk": (3,),
}
ALPHAS = {"diffusion_model.a.alpha": 1.0, "e.alpha": 4.0}


def test_modules_and_keys_left_over():
    grouped = group_lora(SHAPES, alphas=ALPHAS, peft_config=PeftConfig(r=4, lora_alpha=2))
    a = "diffusion_model.a"
    assert grouped.modules == [
        LoraModule(
            "b", "weight", "peft", "lowrank", "b.lora_B.weight", "b.lora_A.weight", None, None,
            2.0, 4, 0.5, (8, 3, 1, 1),
        ),
        LoraModule(
            a, "bias", "diff_b", "diff", None, None, f"{a}.diff_b", None, None, None, 1.0, (8,)
        ),
        LoraModule(
            a, "weight", "lora_up", "lowrank", f"{a}.lora_up.weight", f"{a}.lora_down.weight",
            None, f"{a}.alpha", 1.0, 2, 0.5, (8, 6),
        ),
    ]  # fmt: skip
    tucker = "has a lora_mid (LoCon Tucker): up@down alone is not its delta"
    assert grouped.unmatched == [
        Unmatched("c.lora_down.weight", "rank mismatch: up has rank 2 but down has rank 3"),
        Unmatched("c.lora_up.weight", "rank mismatch: up has rank 2 but down has rank 3"),
        Unmatched("d.lora_up.weight", "up without down"),
        Unmatched("e.alpha", "alpha without up/down"),
        Unmatched("f.lora_down.weight", tucker),
        Unmatched("f.lora_mid.weight", "lora_mid (LoCon mid) ignored"),
        Unmatched("f.lora_up.weight", tucker),
        Unmatched("junk", "not a LoRA key name"),
    ]


def test_same_scales_as_map_lora_against_a_base():
    peft = PeftConfig(r=4, lora_alpha=2)
    base = {"a.weight": (8, 6), "a.bias": (8,), "b.weight": (8, 3, 1, 1)}
    mapping = map_lora(SHAPES, base, alphas=ALPHAS, peft_config=peft)
    grouped = group_lora(SHAPES, alphas=ALPHAS, peft_config=peft)
    assert sorted((p.up_key or p.diff_key, p.scale, p.rank) for p in mapping.patches) == sorted(
        (m.up_key or m.diff_key, m.scale, m.rank) for m in grouped.modules
    )


def test_two_namings_of_one_module_keep_the_first():
    shapes = {
        "m.lora_up.weight": (4, 2),
        "m.lora_down.weight": (2, 4),
        "m.lora_B.weight": (4, 2),
        "m.lora_A.weight": (2, 4),
    }
    grouped = group_lora(shapes)
    assert [m.up_key for m in grouped.modules] == ["m.lora_up.weight"]
    reason = "duplicate: m.lora_up.weight has that module"
    assert grouped.unmatched == [
        Unmatched("m.lora_A.weight", reason),
        Unmatched("m.lora_B.weight", reason),
    ]


def test_no_lora_key_at_all():
    with pytest.raises(CheckpointFormatError) as info:
        group_lora({"blocks.0.weight": (4, 4)}, source="full.safetensors")
    assert str(info.value).startswith(
        "full.safetensors: no LoRA keys recognised (blocks.0.weight) (expected names ending in"
    )


def test_own_targets_name_refused_pairs_and_leave_kohya_out():
    """Targets for resize and convert: a rank mismatch or a LoCon mid still names its target
    (``map_lora`` then says why, as against a base); kohya names need a base."""
    shapes = {**SHAPES, "lora_unet_x_q.lora_up.weight": (8, 2), "lora_unet_x_q.alpha": ()}
    shapes["lora_unet_x_q.lora_down.weight"] = (2, 6)
    assert own_targets(shapes) == {
        "a.bias": (8,),
        "a.weight": (8, 6),
        "b.weight": (8, 3, 1, 1),
        "c.weight": (8, 6),
        "f.weight": (8, 6),
    }
    assert kohya_keys(shapes) == [
        "lora_unet_x_q.alpha",
        "lora_unet_x_q.lora_down.weight",
        "lora_unet_x_q.lora_up.weight",
    ]
