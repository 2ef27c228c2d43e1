"""LoRAs applied to a live model: equal to ``loraforge merge`` bit for bit, changed and removed
with the original bytes restored exactly."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import loraforge
from loraforge.pipeline.errors import LoraMismatch, NonFiniteTensor, ShapeMismatch
from loraforge.pipeline.lora.config import LoraSpec, MergeConfig
from loraforge.pipeline.merge.command import merge
from loraforge.pipeline.merge.options import MergeOptions
from loraforge.pipeline.run.options import RunOptions
from tests.helpers.checkpoints import Q, lora_pair, make_base, rand, save_lora


class Tiny(torch.nn.Module):
    """A module whose state_dict names and shapes are ``BASE_SHAPES``."""

    def __init__(self, tensors: dict):
        super().__init__()
        for key, value in tensors.items():
            owner = self
            *path, name = key.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            if value.is_floating_point():
                owner.register_parameter(
                    name, torch.nn.Parameter(value.clone(), requires_grad=False)
                )
            else:
                owner.register_buffer(name, value.clone())


def two_loras(tmp_path) -> list[str]:
    """Mixed ranks and namings: LightX2V with alpha, PEFT-style without."""
    first = {
        **lora_pair(Q, ".lora_up.weight", ".lora_down.weight", rank=4),
        f"{Q}.alpha": torch.tensor(2.0),
        **lora_pair("blocks.0.ffn.0", ".lora_up.weight", ".lora_down.weight", out=64, rank=8),
        "blocks.0.attn.q.diff_b": rand(48, seed=7),
    }
    second = {
        **lora_pair(Q, ".lora_B.weight", ".lora_A.weight", rank=2, seed=3),
        **lora_pair("blocks.0.attn.k", ".lora_B.weight", ".lora_A.weight", rank=6, seed=5),
    }
    return [
        save_lora(tmp_path, "first.safetensors", first),
        save_lora(tmp_path, "second.safetensors", second),
    ]


def merged(tmp_path, base, loras, strengths, dtype_name):
    config = MergeConfig(tuple(LoraSpec(p, s) for p, s in zip(loras, strengths, strict=True)))
    out = tmp_path / f"merged-{dtype_name}-{'_'.join(map(str, strengths))}.safetensors"
    merge(
        source_model=base,
        loras=config,
        output=str(out),
        options=MergeOptions(output_dtype=dtype_name),
        run=RunOptions(device="cpu", workers=2),
    )
    return load_file(out)


@pytest.mark.parametrize(
    "dtype, name", [(torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")]
)
def test_apply_equals_merge_bit_for_bit(tmp_path, dtype, name):
    base, tensors = make_base(tmp_path, dtype=dtype)
    loras = two_loras(tmp_path)
    model = Tiny(tensors)
    handle = loraforge.apply(model, loraforge.LoraSet([(loras[0], 0.8), (loras[1], -0.5)]))
    expected = merged(tmp_path, base, loras, [0.8, -0.5], name)
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key].view(torch.uint8), value.view(torch.uint8)), key
    assert handle.touched == [
        "blocks.0.attn.k.weight",
        "blocks.0.attn.q.bias",
        "blocks.0.attn.q.weight",
        "blocks.0.ffn.0.weight",
    ]
    sizes = {k: tensors[k].numel() * tensors[k].element_size() for k in handle.touched}
    assert handle.held_bytes == sum(sizes.values())


def test_a_hundred_cycles_restore_every_byte(tmp_path):
    _base, tensors = make_base(tmp_path, dtype=torch.bfloat16)
    loras = two_loras(tmp_path)
    model = Tiny(tensors)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for cycle in range(100):
        handle = loraforge.apply(model, [(loras[0], 1.0)])
        handle.add(loras[1], float(torch.rand(1, generator=g)) * 2 - 1)
        handle.set_strengths([float(s) for s in torch.rand(2, generator=g) * 4 - 2])
        if cycle % 2:
            handle.remove_lora(0)
        handle.remove()
        assert handle.held_bytes == 0 and handle.touched == []
    for key, value in model.state_dict().items():
        assert torch.equal(value.view(torch.uint8), start[key].view(torch.uint8)), key


def test_changing_strengths_equals_a_fresh_apply(tmp_path):
    _base, tensors = make_base(tmp_path, dtype=torch.bfloat16)
    loras = two_loras(tmp_path)
    changed, fresh = Tiny(tensors), Tiny(tensors)
    handle = loraforge.apply(changed, [(loras[0], 1.0), (loras[1], 1.0)])
    handle.set_strengths([0.3, 2.0])
    loraforge.apply(fresh, [(loras[0], 0.3), (loras[1], 2.0)])
    for key, value in fresh.state_dict().items():
        assert torch.equal(changed.state_dict()[key].view(torch.uint8), value.view(torch.uint8))
    assert handle.strengths == [0.3, 2.0]


def test_removing_one_lora_leaves_the_other(tmp_path):
    _base, tensors = make_base(tmp_path, dtype=torch.float16)
    loras = two_loras(tmp_path)
    both, second_only = Tiny(tensors), Tiny(tensors)
    handle = loraforge.apply(both, [(loras[0], 0.7), (loras[1], 0.4)])
    handle.remove_lora(loras[0])
    loraforge.apply(second_only, [(loras[1], 0.4)])
    for key, value in second_only.state_dict().items():
        assert torch.equal(both.state_dict()[key].view(torch.uint8), value.view(torch.uint8))
    assert handle.touched == ["blocks.0.attn.k.weight", "blocks.0.attn.q.weight"]
    # the ffn weight only the first LoRA touched has its original back and is not held
    ffn = "blocks.0.ffn.0.weight"
    assert torch.equal(both.state_dict()[ffn], tensors[ffn])
    assert handle.held_bytes == (48 * 32 * 2) * 2  # the two weights still touched, fp16


def test_a_state_dict_and_a_checkpoint_to_reread_from_hold_nothing(tmp_path):
    base, tensors = make_base(tmp_path, dtype=torch.bfloat16)
    loras = two_loras(tmp_path)
    state = {k: v.clone() for k, v in load_file(base).items()}
    handle = loraforge.apply(state, [(loras[0], 1.0)], checkpoint=base)
    assert handle.held_bytes == 0
    assert not torch.equal(state[f"{Q}.weight"], tensors[f"{Q}.weight"])
    handle.remove()
    for key, value in tensors.items():
        assert torch.equal(state[key].view(torch.uint8), value.view(torch.uint8)), key


def test_originals_on_the_cpu_and_a_weight_that_differs_from_the_checkpoint(tmp_path):
    base, tensors = make_base(tmp_path, dtype=torch.float32)
    loras = two_loras(tmp_path)
    state = {k: v.clone() for k, v in tensors.items()}
    state[f"{Q}.weight"] += 1  # no longer what the checkpoint holds: must be copied
    handle = loraforge.apply(state, [(loras[0], 1.0)], checkpoint=base, originals="cpu")
    assert handle.held_bytes == 48 * 32 * 4
    handle.remove()
    assert torch.equal(state[f"{Q}.weight"], tensors[f"{Q}.weight"] + 1)


def test_a_bf16_model_loaded_from_fp32_files_rereads_and_casts(tmp_path):
    base, tensors = make_base(tmp_path, dtype=torch.float32)
    loras = two_loras(tmp_path)
    model = Tiny(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    )
    start = {k: v.clone() for k, v in model.state_dict().items()}
    handle = loraforge.apply(model, [(loras[0], 1.0), (loras[1], 0.5)], checkpoint=base)
    assert handle.held_bytes == 0
    handle.set_strengths([2.0, -1.0])
    fresh = Tiny({k: v.clone() for k, v in start.items()})
    loraforge.apply(fresh, [(loras[0], 2.0), (loras[1], -1.0)])  # originals held as copies
    for key, value in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[key].view(torch.uint8), value.view(torch.uint8))
    handle.remove()
    for key, value in model.state_dict().items():
        assert torch.equal(value.view(torch.uint8), start[key].view(torch.uint8)), key


def test_a_checkpoint_index_under_the_modules_names(tmp_path):
    """A checkpoint whose names differ from the module's (Wan's original layout under a
    diffusers-named model) is handed over as an index keyed by the module's names."""
    from loraforge.pipeline.io.reader import index_checkpoint

    base, tensors = make_base(tmp_path, dtype=torch.bfloat16)
    index = index_checkpoint(base)
    renamed = {"renamed." + k: v for k, v in index.tensors.items()}
    index = type(index)(index.path, index.format, renamed, index.files)
    model = Tiny({"renamed." + k: v for k, v in tensors.items()})
    lora = save_lora(
        tmp_path,
        "renamed.safetensors",
        lora_pair("renamed." + Q, ".lora_up.weight", ".lora_down.weight"),
    )
    handle = loraforge.apply(model, [lora], checkpoint=index)
    assert handle.touched == [f"renamed.{Q}.weight"] and handle.held_bytes == 0
    handle.remove()
    assert torch.equal(model.state_dict()[f"renamed.{Q}.weight"], tensors[f"{Q}.weight"])


def test_replace_switches_in_one_pass_and_equals_a_fresh_apply(tmp_path):
    _base, tensors = make_base(tmp_path, dtype=torch.bfloat16)
    loras = two_loras(tmp_path)
    switched, fresh = Tiny(tensors), Tiny(tensors)
    handle = loraforge.apply(switched, [(loras[0], 1.0)])
    handle.replace([(loras[1], 0.5)])
    loraforge.apply(fresh, [(loras[1], 0.5)])
    for key, value in fresh.state_dict().items():
        assert torch.equal(switched.state_dict()[key].view(torch.uint8), value.view(torch.uint8))
    assert handle.loras == [loras[1]] and handle.strengths == [0.5]
    handle.replace([])
    for key, value in tensors.items():
        assert torch.equal(switched.state_dict()[key].view(torch.uint8), value.view(torch.uint8))
    assert handle.held_bytes == 0


def test_a_failure_part_way_is_undone_by_remove(tmp_path):
    """The new LoRA fails on the first weight recomputed (attn.k sorts first), while the
    weights only the old LoRA touched are still patched: the model and the handle are as they
    were before replace(), and remove() restores every weight."""
    _base, tensors = make_base(tmp_path, dtype=torch.float32)
    loras = two_loras(tmp_path)
    bad = lora_pair("blocks.0.attn.k", ".lora_up.weight", ".lora_down.weight", rank=2)
    bad["blocks.0.attn.k.lora_up.weight"][0, 0] = float("nan")
    bad_path = save_lora(tmp_path, "nan.safetensors", bad)
    model = Tiny(tensors)
    handle = loraforge.apply(model, [(loras[0], 1.0)])
    patched = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteTensor):
        handle.replace([(bad_path, 1.0)])
    for key, value in patched.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert (handle.loras, handle.strengths) == ([loras[0]], [1.0])
    handle.remove()
    for key, value in tensors.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert handle.held_bytes == 0


def test_unmatched_keys_are_listed_and_strict_refuses(tmp_path):
    _base, tensors = make_base(tmp_path)
    lora = save_lora(
        tmp_path,
        "odd.safetensors",
        {
            **lora_pair(Q, ".lora_up.weight", ".lora_down.weight"),
            **lora_pair("blocks.0.attn.k", ".lora_up.weight", ".lora_down.weight", inp=16),
        },
    )
    model = Tiny(tensors)
    handle = loraforge.apply(model, [lora])
    assert [u.lora_key for u in handle.unmatched[0]] == [
        "blocks.0.attn.k.lora_down.weight",
        "blocks.0.attn.k.lora_up.weight",
    ]
    handle.remove()
    with pytest.raises(ShapeMismatch) as caught:
        loraforge.apply(Tiny(tensors), [lora], strict=True)
    assert isinstance(caught.value, LoraMismatch)
    assert "shape mismatch: up@down is 48x16 but base is 48x32" in str(caught.value)


def test_lora_set_from_both_config_shapes(tmp_path):
    loras = two_loras(tmp_path)
    (tmp_path / "a.json").write_text(
        json.dumps({"lora_configs": [{"path": "first.safetensors", "strength": 0.5}]})
    )
    (tmp_path / "b.json").write_text(
        json.dumps({"lora_path": ["first.safetensors", "second.safetensors"], "strength_model": 2})
    )
    a = loraforge.LoraSet.from_config(tmp_path / "a.json")
    b = loraforge.LoraSet.from_config(tmp_path / "b.json")
    assert [(s.path, s.strength) for s in a.specs] == [(loras[0], 0.5)]
    assert [(s.path, s.strength) for s in b.specs] == [(loras[0], 2.0), (loras[1], 2.0)]
    assert loraforge.LoraSet([loras[0], (loras[1], 3)]).strengths == [1.0, 3.0]
    assert os.path.isabs(loraforge.LoraSet(["x.safetensors"]).specs[0].path)


@pytest.mark.gpu
def test_apply_on_cuda_restores_bytes(tmp_path):
    _base, tensors = make_base(tmp_path, dtype=torch.bfloat16)
    loras = two_loras(tmp_path)
    model = Tiny(tensors).cuda()
    handle = loraforge.apply(model, [(loras[0], 0.5), (loras[1], 1.5)])
    assert model.state_dict()[f"{Q}.weight"].device.type == "cuda"
    handle.remove()
    for key, value in model.state_dict().items():
        assert torch.equal(value.cpu().view(torch.uint8), tensors[key].view(torch.uint8)), key


def test_check_and_summaries_say_what_a_lora_patches_without_patching(tmp_path):
    _base, tensors = make_base(tmp_path)
    loras = two_loras(tmp_path)
    odd = save_lora(
        tmp_path,
        "odd.safetensors",
        {
            **lora_pair(Q, ".lora_up.weight", ".lora_down.weight"),
            **lora_pair("blocks.9.attn.k", ".lora_up.weight", ".lora_down.weight"),
        },
    )
    model = Tiny(tensors)
    handle = loraforge.apply(model, [])
    (checked,) = handle.check([(odd, 0.5)])
    assert (checked["path"], checked["strength"], checked["keys"], checked["patches"]) == (
        odd,
        0.5,
        4,
        1,
    )
    assert checked["unmatched"] == {
        "blocks.9.attn.k.lora_down.weight": "targets no base tensor",
        "blocks.9.attn.k.lora_up.weight": "targets no base tensor",
    }
    assert handle.touched == [] and torch.equal(
        model.state_dict()[f"{Q}.weight"], tensors[f"{Q}.weight"]
    )
    with pytest.raises(LoraMismatch):
        loraforge.apply(model, [], strict=True).check([odd])
    handle.replace([(loras[1], 2.0)])
    assert [
        (s["path"], s["strength"], s["patches"], s["unmatched"]) for s in handle.summaries()
    ] == [(loras[1], 2.0, 2, {})]
