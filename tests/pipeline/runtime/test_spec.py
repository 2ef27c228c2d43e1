"""What a run reads before loading: each transformer's checkpoint headers, once (loading and the
run's inputs use them again), and a note for a folder whose weights cannot be re-read."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from loraforge.pipeline.lora.config import LoraSpec
from loraforge.pipeline.runtime.spec import RuntimeOptions, open_spec

pytest.importorskip("diffusers")


def test_the_transformers_headers_are_read_once_per_run(wan_sample, monkeypatch):
    from loraforge.pipeline.runtime import original, spec
    from loraforge.pipeline.runtime.generate import Runtime

    path = wan_sample["transformer_original"]
    options = RuntimeOptions(
        "wan2.1", "t2v", wan_sample["model"], transformer_path=path, dtype="fp32"
    )
    opened = open_spec(options, "cpu")
    assert (opened.checkpoints["transformer"].path, opened.notes) == (path, ())

    def read_again(*args):
        raise AssertionError("headers read again")

    monkeypatch.setattr(spec, "index_checkpoint", read_again)
    monkeypatch.setattr(original, "index_checkpoint", read_again)
    inputs = [p.path for p in opened.inputs() if p.role == "--transformer_path"]
    assert inputs == [path]
    runtime = Runtime.load(opened)
    assert runtime.switch({"transformer": (LoraSpec(wan_sample["style_a"]),)})
    assert runtime.loras.held_bytes == 0  # originals re-read through the same headers


def test_a_folder_not_in_safetensors_is_noted(wan_sample, tmp_path):
    model = str(tmp_path / "model")
    shutil.copytree(wan_sample["model"], model)
    weights = os.path.join(model, "transformer", "diffusion_pytorch_model.safetensors")
    torch.save(
        load_file(weights), os.path.join(model, "transformer", "diffusion_pytorch_model.bin")
    )
    os.remove(weights)
    opened = open_spec(RuntimeOptions("wan2.1", "t2v", model), "cpu")
    assert opened.checkpoints == {"transformer": None}
    assert opened.notes == (
        f"transformer: weights not re-readable ({model}/transformer: directory holds no "
        ".safetensors files (point at the checkpoint file or its shard directory)); LoRAs keep "
        "copies of the weights they patch",
    )
