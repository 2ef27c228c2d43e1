"""LoRA switching on a loaded Wan 2.2 MoE model: each expert gets its own set, a switch back to
none gives the base's bytes, and a switch that fails part-way leaves both experts at the base's
bytes."""

import pytest
from safetensors.torch import load_file, save_file

from loraforge.pipeline.errors import NonFiniteTensor
from loraforge.pipeline.lora.config import LoraSpec
from loraforge.pipeline.runtime.loras import weights_digest

pytest.importorskip("diffusers")


def test_moe_switching_per_expert_and_after_a_failure(wan_sample, tmp_path):
    from loraforge.pipeline.runtime.generate import Runtime
    from loraforge.pipeline.runtime.spec import RuntimeOptions, open_spec

    options = RuntimeOptions("wan2.2_moe", "t2v", wan_sample["model_moe"], dtype="fp32")
    runtime = Runtime.load(open_spec(options, "cpu"))
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
