"""LoRA switching on a loaded Wan 2.2 MoE model: each expert gets its own set, a switch back to
none gives the base's bytes, a switch that fails part-way leaves both experts at the base's
bytes, and a switch opens only the LoRAs of the experts whose set changed."""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.pipeline.errors import LoraMismatch, NonFiniteTensor
from loraforge.pipeline.lora.config import LoraSpec
from loraforge.pipeline.runtime.loras import weights_digest

pytest.importorskip("diffusers")


def moe_runtime(wan_sample):
    from loraforge.pipeline.runtime.generate import Runtime
    from loraforge.pipeline.runtime.spec import RuntimeOptions, open_spec

    options = RuntimeOptions("wan2.2_moe", "t2v", wan_sample["model_moe"], dtype="fp32")
    return Runtime.load(open_spec(options, "cpu"))


def test_moe_switching_per_expert_and_after_a_failure(wan_sample, tmp_path):
    runtime = moe_runtime(wan_sample)
    base = {
        name: weights_digest([(name, getattr(runtime.pipe, name))])
        for name in runtime.loras.handles
    }
    a, b = LoraSpec(wan_sample["style_a"], 1.0), LoraSpec(wan_sample["style_b"], 0.5)
    assert runtime.switch({"transformer": (a,), "transformer_2": ()})
    now = {name: weights_digest([(name, getattr(runtime.pipe, name))]) for name in base}
    assert (
        now["transformer"] != base["transformer"] and now["transformer_2"] == base["transformer_2"]
    )
    assert not runtime.switch({"transformer": (a,), "transformer_2": ()})  # unchanged: no work
    bad = load_file(wan_sample["style_b"])
    bad["diffusion_model.blocks.1.ffn.2.lora_up.weight"][0, 0] = float("nan")
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(NonFiniteTensor):
        runtime.switch(
            {"transformer": (b,), "transformer_2": (LoraSpec(str(tmp_path / "nan.safetensors")),)}
        )
    assert runtime.loras.applied() == [] and runtime.loras.held_bytes == 0
    for name in base:
        assert weights_digest([(name, getattr(runtime.pipe, name))]) == base[name]
    runtime.switch({"transformer": (b,), "transformer_2": (a,)})
    runtime.switch({"transformer": (), "transformer_2": ()})
    assert {name: weights_digest([(name, getattr(runtime.pipe, name))]) for name in base} == base


def test_a_switch_opens_only_the_changed_loras_and_a_refused_one_changes_nothing(
    wan_sample, tmp_path, monkeypatch
):
    from loraforge.pipeline.apply import handle

    runtime = moe_runtime(wan_sample)
    opened = []
    open_lora = handle.open_lora

    def recording(spec, *args):
        opened.append(os.path.basename(spec.path))
        return open_lora(spec, *args)

    monkeypatch.setattr(handle, "open_lora", recording)
    a, b = LoraSpec(wan_sample["style_a"], 1.0), LoraSpec(wan_sample["style_b"], 0.5)
    runtime.switch({"transformer": (a,), "transformer_2": ()})
    assert opened == ["style_a.safetensors"] * 2  # checked, then applied
    opened.clear()
    runtime.switch({"transformer": (a,), "transformer_2": (b,)})
    assert opened == ["style_b.safetensors"] * 2  # transformer's set is unchanged
    digest = runtime.digest()
    foreign = str(tmp_path / "foreign.safetensors")
    save_file(
        {
            "diffusion_model.other.lora_down.weight": torch.ones(2, 3),
            "diffusion_model.other.lora_up.weight": torch.ones(3, 2),
        },
        foreign,
    )
    with pytest.raises(LoraMismatch) as caught:
        runtime.switch({"transformer": (b,), "transformer_2": (LoraSpec(foreign),)})
    assert str(caught.value) == (
        f"{foreign}: none of its 2 keys patches the base, e.g. "
        "'diffusion_model.other.lora_down.weight': targets no base tensor (is this LoRA for "
        "another model?)"
    )
    assert runtime.loras.applied() == [
        {"model": "transformer", "path": a.path, "strength": 1.0},
        {"model": "transformer_2", "path": b.path, "strength": 0.5},
    ]
    assert runtime.digest() == digest
