import json
import math

import pytest

from loraforge.pipeline.errors import CheckpointFormatError, CheckpointNotFound
from loraforge.pipeline.lora.adapter_config import PeftConfig, load_peft_config
from loraforge.pipeline.lora.keys import LoraPatch, Unmatched, map_lora

Q = "blocks.0.attn.q"
BASE = {f"{Q}.weight": (64, 32), f"{Q}.bias": (64,), "blocks.0.modulation": (6, 64)}


def pair(module, up_suffix, down_suffix, out=64, rank=4, inp=32):
    return {f"{module}{up_suffix}": (out, rank), f"{module}{down_suffix}": (rank, inp)}


def reasons(mapping):
    return {u.lora_key: u.reason for u in mapping.unmatched}


@pytest.mark.parametrize(
    "up_suffix, down_suffix",
    [
        (".lora_up.weight", ".lora_down.weight"),
        ("_lora.up.weight", "_lora.down.weight"),
        (".lora_B.weight", ".lora_A.weight"),
        (".lora_B", ".lora_A"),
        (".lora.up.weight", ".lora.down.weight"),
        (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
        (".lora_B.default.weight", ".lora_A.default.weight"),
    ],
    ids=["kohya", "_lora", "peft", "mochi", "lora.up", "diffusers", "peft_default"],
)
def test_each_lowrank_naming(up_suffix, down_suffix):
    mapping = map_lora(pair(Q, up_suffix, down_suffix), BASE)
    assert mapping.patches == [
        LoraPatch(f"{Q}.weight", "lowrank", Q + up_suffix, Q + down_suffix, None, 1.0, 4)
    ]
    assert mapping.unmatched == []


def test_alpha_scales_by_rank():
    lora = {**pair(Q, ".lora_up.weight", ".lora_down.weight"), f"{Q}.alpha": ()}
    mapping = map_lora(lora, BASE, alphas={f"{Q}.alpha": 8.0})
    assert mapping.patches[0].scale == 2.0
    assert mapping.unmatched == []


@pytest.mark.parametrize(
    "suffix, base_key, shape",
    [(".diff", f"{Q}.weight", (64, 32)), (".diff_b", f"{Q}.bias", (64,))]
    + [(".diff_m", "blocks.0.modulation", (6, 64))],
)
def test_diff_namings(suffix, base_key, shape):
    module = base_key.rpartition(".")[0]
    mapping = map_lora({module + suffix: shape}, BASE)
    assert mapping.patches == [LoraPatch(base_key, "diff", None, None, module + suffix, 1.0, None)]


@pytest.mark.parametrize(
    "lora_module, base_key",
    [
        ("diffusion_model.blocks.0.q", "blocks.0.q.weight"),
        ("transformer.blocks.0.q", "blocks.0.q.weight"),
        ("unet.blocks.0.q", "blocks.0.q.weight"),
        ("base_model.model.model.layers.0.q", "layers.0.q.weight"),
        ("base_model.model.model.layers.0.q", "model.layers.0.q.weight"),
        ("blocks.0.q", "model.diffusion_model.blocks.0.q.weight"),
        ("transformer.blocks.0.q", "model.diffusion_model.blocks.0.q.weight"),
    ],
)
def test_prefixes_stripped_and_added(lora_module, base_key):
    lora = pair(lora_module, ".lora_B.weight", ".lora_A.weight")
    mapping = map_lora(lora, {base_key: (64, 32), "other.weight": (64, 32)})
    assert [p.base_key for p in mapping.patches] == [base_key]


def test_least_stripped_name_wins():
    lora = pair("base_model.model.model.layers.0.q", ".lora_B.weight", ".lora_A.weight")
    base = {"model.layers.0.q.weight": (64, 32), "layers.0.q.weight": (64, 32)}
    assert map_lora(lora, base).patches[0].base_key == "model.layers.0.q.weight"


def test_ambiguous_prefix_added():
    lora = pair("blocks.0.q", ".lora_up.weight", ".lora_down.weight")
    base = {"model.blocks.0.q.weight": (64, 32), "unet.blocks.0.q.weight": (64, 32)}
    mapping = map_lora(lora, base)
    assert mapping.patches == []
    assert set(reasons(mapping).values()) == {
        "ambiguous name: matches model.blocks.0.q.weight, unet.blocks.0.q.weight"
    }


@pytest.mark.parametrize("base_prefix", ["", "model.diffusion_model."])
def test_kohya_names_with_underscores(base_prefix):
    module = "lora_unet_blocks_0_self_attn_q"
    lora = {**pair(module, ".lora_up.weight", ".lora_down.weight"), f"{module}.alpha": ()}
    base = {f"{base_prefix}blocks.0.self_attn.q.weight": (64, 32), "blocks.0.ffn.weight": (64, 32)}
    mapping = map_lora(lora, base, alphas={f"{module}.alpha": 1.0})
    (patch,) = mapping.patches
    assert patch.base_key == f"{base_prefix}blocks.0.self_attn.q.weight"
    assert patch.scale == 0.25
    assert mapping.unmatched == []


def test_kohya_text_encoder_and_diff_names():
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    lora = {
        **pair(te, ".lora_up.weight", ".lora_down.weight"),
        "lora_unet_blocks_0_norm.diff_b": (8,),
    }
    base = {
        "text_model.encoder.layers.0.self_attn.q_proj.weight": (64, 32),
        "blocks.0.norm.weight": (8,),
        "blocks.0.norm.bias": (8,),
    }
    mapping = map_lora(lora, base)
    assert [(p.base_key, p.kind) for p in mapping.patches] == [
        ("blocks.0.norm.bias", "diff"),
        ("text_model.encoder.layers.0.self_attn.q_proj.weight", "lowrank"),
    ]


def test_ambiguous_kohya_name():
    lora = pair("lora_unet_blocks_0_self_attn_q", ".lora_up.weight", ".lora_down.weight")
    base = {"blocks.0.self_attn.q.weight": (64, 32), "blocks.0.self.attn_q.weight": (64, 32)}
    mapping = map_lora(lora, base)
    assert mapping.patches == []
    assert len(mapping.unmatched) == 2
    assert all(u.reason.startswith("ambiguous kohya name: ") for u in mapping.unmatched)


def test_peft_config_scales(tmp_path):
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"blocks.1.q": 16},
        "alpha_pattern": {"blocks.1.q": 64, "k": 2},
        "target_modules": ["q", "k"],
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    peft = load_peft_config(tmp_path)
    assert peft == PeftConfig(4, 8.0, False, {"blocks.1.q": 16}, {"blocks.1.q": 64.0, "k": 2.0})
    lora = {
        **pair("base_model.model.blocks.0.q", ".lora_B.weight", ".lora_A.weight"),
        **pair("base_model.model.blocks.1.q", ".lora_B.weight", ".lora_A.weight", rank=16),
        **pair("base_model.model.blocks.1.k", ".lora_B.weight", ".lora_A.weight"),
        **pair("base_model.model.blocks.2.q", ".lora_B.weight", ".lora_A.weight"),
        "base_model.model.blocks.2.q.alpha": (),
    }
    base = {f"blocks.{i}.{m}.weight": (64, 32) for i in range(3) for m in "qk"}
    alphas = {"base_model.model.blocks.2.q.alpha": 1.0}
    mapping = map_lora(lora, base, alphas=alphas, peft_config=peft)
    scales = {p.base_key: (p.scale, p.rank) for p in mapping.patches}
    assert scales == {
        "blocks.0.q.weight": (2.0, 4),  # lora_alpha / r
        "blocks.1.q.weight": (4.0, 16),  # rank_pattern and alpha_pattern
        "blocks.1.k.weight": (0.5, 4),  # alpha_pattern "k" matches "...blocks.1.k"
        "blocks.2.q.weight": (0.25, 4),  # the file's alpha wins over the config
    }


def test_peft_pattern_matching_and_rslora():
    peft = PeftConfig(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"attn.q": 32})
    assert peft.alpha_for("base_model.model.blocks.0.attn.q") == 32
    assert peft.alpha_for("attn.q") == 32
    assert peft.alpha_for("blocks.0.xattn.q") == 8  # must follow a "." or start the name
    assert peft.alpha_for("blocks.0.attn.qk") == 8
    assert peft.scale_for("blocks.0.k", 16) == 8 / math.sqrt(16)
    assert PeftConfig(r=8, lora_alpha=8, rank_pattern={"q": 2}).rank_for("a.q") == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not a readable JSON file"),
        ('{"lora_alpha": 8}', "'r' must be a positive integer"),
        ('{"r": 0}', "'r' must be a positive integer"),
        ('{"r": 4, "lora_alpha": "x"}', "'lora_alpha' must be a number"),
        ('{"r": 4, "rank_pattern": {"(": 2}}', "not a valid regex"),
        ('{"r": 4, "use_dora": true}', "DoRA"),
        ('{"r": 4, "peft_type": "LOHA"}', "not 'LORA'"),
        ("[4]", "expected a JSON object"),
    ],
)
def test_load_peft_config_errors(tmp_path, text, message):
    path = tmp_path / "adapter_config.json"
    path.write_text(text)
    with pytest.raises(CheckpointFormatError, match=message) as info:
        load_peft_config(str(path))
    assert info.value.path == str(path)


def test_load_peft_config_missing(tmp_path):
    with pytest.raises(CheckpointNotFound):
        load_peft_config(tmp_path)


def test_every_unmatched_reason():
    base = {
        **{f"b.{i}.weight": (64, 32) for i in range(7)},
        "b.7.weight": (32, 16, 3, 3),
        "b.8.weight": (32, 16, 3, 3),
        "b.0.bias": (64,),
    }
    lora = {
        "b.0.lora_up.weight": (64, 4),  # up without down
        "b.1.lora_down.weight": (4, 32),  # down without up
        **pair("b.2", ".lora_up.weight", ".lora_down.weight", rank=8)
        | {"b.2.lora_down.weight": (4, 32)},
        **pair("b.3", ".lora_up.weight", ".lora_down.weight", inp=48),
        **pair("b.4", ".lora_up.weight", ".lora_down.weight"),
        **pair("b.4", ".lora_B.weight", ".lora_A.weight"),  # second naming, same target
        **pair("nowhere", ".lora_up.weight", ".lora_down.weight"),
        "nowhere.alpha": (),
        "b.5.alpha": (),
        "b.0.diff_b": (32,),
        "b.7.lora_up.weight": (32, 4, 1, 1),  # conv: 32 x (16*3*3) is fine
        "b.7.lora_down.weight": (4, 16, 3, 3),
        **pair("b.8", ".lora_up.weight", ".lora_down.weight", out=32, inp=16),
        "b.8.lora_mid.weight": (4, 4, 3, 3),
        "b.6.lora_up.weight": (64,),
        "b.6.lora_down.weight": (4, 32),
        "metadata_tensor": (1,),
    }
    alphas = {"nowhere.alpha": 4.0, "b.5.alpha": 4.0}
    mapping = map_lora(lora, base, alphas=alphas)
    assert [p.base_key for p in mapping.patches] == ["b.4.weight", "b.7.weight"]
    assert mapping.patches[0].up_key == "b.4.lora_up.weight"
    mid_pair = "has a lora_mid (LoCon Tucker): up@down alone is not its delta"
    assert reasons(mapping) == {
        "b.0.lora_up.weight": "up without down",
        "b.1.lora_down.weight": "down without up",
        "b.2.lora_up.weight": "rank mismatch: up has rank 8 but down has rank 4",
        "b.2.lora_down.weight": "rank mismatch: up has rank 8 but down has rank 4",
        "b.3.lora_up.weight": "shape mismatch: up@down is 64x48 but base is 64x32",
        "b.3.lora_down.weight": "shape mismatch: up@down is 64x48 but base is 64x32",
        "b.4.lora_B.weight": "duplicate target: b.4.weight already patched by b.4.lora_up.weight",
        "b.4.lora_A.weight": "duplicate target: b.4.weight already patched by b.4.lora_up.weight",
        "nowhere.lora_up.weight": "targets no base tensor",
        "nowhere.lora_down.weight": "targets no base tensor",
        "nowhere.alpha": "alpha of an unmatched up/down pair",
        "b.5.alpha": "alpha without up/down",
        "b.0.diff_b": "shape mismatch: diff is 32 but base is 64",
        "b.8.lora_mid.weight": "lora_mid (LoCon mid) ignored",
        "b.8.lora_up.weight": mid_pair,
        "b.8.lora_down.weight": mid_pair,
        "b.6.lora_up.weight": "not a low-rank pair: up is 64 and down is 4x32",
        "b.6.lora_down.weight": "not a low-rank pair: up is 64 and down is 4x32",
        "metadata_tensor": "not a LoRA key name",
    }
    assert [u.lora_key for u in mapping.unmatched] == sorted(reasons(mapping))


def test_conv_shape_mismatch():
    lora = {"c.lora_up.weight": (32, 4, 1, 1), "c.lora_down.weight": (4, 16, 1, 1)}
    mapping = map_lora(lora, {"c.weight": (32, 16, 3, 3)})
    assert mapping.unmatched[0] == Unmatched(
        "c.lora_down.weight", "shape mismatch: up@down is 32x16 but base is 32x16x3x3"
    )


def test_duplicate_across_diff_and_lowrank_and_prefixes():
    lora = {
        **pair("diffusion_model." + Q, ".lora_up.weight", ".lora_down.weight"),
        f"{Q}.diff": (64, 32),
    }
    mapping = map_lora(lora, BASE)
    assert len(mapping.patches) == 1
    assert reasons(mapping)[f"{Q}.diff"].startswith("duplicate target: ")


def test_patches_sorted_by_base_key():
    lora = {
        **pair("z", ".lora_B", ".lora_A"),
        **pair("a", ".lora_B", ".lora_A"),
    }
    mapping = map_lora(lora, {"z.weight": (64, 32), "a.weight": (64, 32)})
    assert [p.base_key for p in mapping.patches] == ["a.weight", "z.weight"]


def test_no_lora_keys():
    keys = {f"blocks.{i}.weight": (4, 4) for i in range(8)}
    with pytest.raises(CheckpointFormatError, match="no LoRA keys recognised") as info:
        map_lora(keys, keys, source="full.safetensors")
    assert info.value.path == "full.safetensors"
    assert "blocks.0.weight" in str(info.value) and "blocks.7.weight" not in str(info.value)
    with pytest.raises(CheckpointFormatError, match="holds no tensors"):
        map_lora({}, keys)


def test_alpha_value_must_be_passed():
    lora = {**pair(Q, ".lora_up.weight", ".lora_down.weight"), f"{Q}.alpha": ()}
    with pytest.raises(ValueError, match="alphas"):
        map_lora(lora, BASE)
