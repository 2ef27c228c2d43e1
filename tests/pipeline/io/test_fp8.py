"""Reading scaled-fp8 checkpoints: each convention found from headers, each weight paired with its
scale, the bookkeeping named, malformed bookkeeping refused naming file and tensor."""

import json

import pytest
import torch
from safetensors import safe_open

from loraforge.pipeline.errors import CheckpointFormatError
from loraforge.pipeline.io.reader import index_checkpoint, load_tensor, load_weight
from tests.helpers import fp8
from tests.helpers.checkpoints import save_sharded

Q, K = "blocks.0.attn.q.weight", "blocks.0.attn.k.weight"
FORMATS = ("float8_e4m3fn", "float8_e5m2")


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        Q: torch.randn(8, 4, generator=g),
        K: torch.randn(8, 4, generator=g),
        "blocks.0.attn.q.bias": torch.randn(8, generator=g),
        "blocks.0.norm.weight": torch.ones(4),
    }


@pytest.mark.parametrize(
    ("convention", "scale_shape"),
    [("scaled_fp8", ()), ("comfy_quant", ()), ("lightx2v", (8, 1))],
)
def test_each_convention_pairs_weights_with_scales(tmp_path, convention, scale_shape):
    stored, metadata = fp8.scaled(tensors(), [Q, K], convention, per_row=bool(scale_shape))
    index = index_checkpoint(fp8.save(stored, tmp_path / "m.safetensors", metadata))
    scale_key = Q.removesuffix(".weight") + fp8.SCALE[convention]
    assert index.fp8.convention == convention
    assert index.fp8.scales[Q] == scale_key
    assert index.tensors[Q].scale == index.tensors[scale_key]
    assert index.tensors[Q].scale.shape == scale_shape
    assert index.tensors["blocks.0.attn.q.bias"].scale is None
    assert index.fp8.companions[scale_key] == f"fp8 scale of {Q} (applied when reading it)"
    assert index.fp8.metadata == (metadata or {})
    assert torch.equal(load_weight(index.tensors[Q]), fp8.value(stored, Q, convention))
    assert load_tensor(index.tensors[Q]).dtype == torch.float8_e4m3fn  # as stored


def test_markers_and_activation_scales_are_bookkeeping(tmp_path):
    stored, _ = fp8.scaled(tensors(), [Q], "scaled_fp8")
    stored["blocks.0.attn.q.scale_input"] = torch.tensor(1.0)
    index = index_checkpoint(fp8.save(stored, tmp_path / "m.safetensors"))
    assert index.fp8.companions == {
        "scaled_fp8": "scaled-fp8 marker (bookkeeping, not a weight)",
        "blocks.0.attn.q.scale_input": "activation scale (does not change the weight)",
        "blocks.0.attn.q.scale_weight": f"fp8 scale of {Q} (applied when reading it)",
    }
    assert index.tensors[K].scale is None  # unquantized weights stay plain


def test_scales_of_a_sharded_checkpoint_are_found_across_shards(tmp_path):
    stored, metadata = fp8.scaled(tensors(), [Q, K], "comfy_quant")
    save_sharded(stored, str(tmp_path / "dir"), shards=3)
    # Hugging Face shards carry the metadata in each file's header.
    for shard in sorted((tmp_path / "dir").glob("*.safetensors")):
        part = {k: v for k, v in stored.items() if k in _keys(shard)}
        fp8.save(part, shard, metadata)
    index = index_checkpoint(str(tmp_path / "dir"))
    assert index.fp8.scales == {
        K: "blocks.0.attn.k.weight_scale",
        Q: "blocks.0.attn.q.weight_scale",
    }
    assert torch.equal(load_weight(index.tensors[K]), fp8.value(stored, K, "comfy_quant"))


def test_shards_each_listing_their_own_quantized_layers_are_joined(tmp_path):
    stored, _ = fp8.scaled(tensors(), [Q, K], "comfy_quant")
    save_sharded(stored, str(tmp_path / "dir"), shards=2)
    for shard in sorted((tmp_path / "dir").glob("*.safetensors")):
        part = {k: v for k, v in stored.items() if k in _keys(shard)}
        layers = {
            k.removesuffix(".weight"): {"format": "float8_e4m3fn"} for k in (Q, K) if k in part
        }
        fp8.save(part, shard, {"_quantization_metadata": json.dumps({"layers": layers})})
    index = index_checkpoint(str(tmp_path / "dir"))
    assert index.fp8.scales == {
        K: "blocks.0.attn.k.weight_scale",
        Q: "blocks.0.attn.q.weight_scale",
    }
    assert json.loads(index.fp8.metadata["_quantization_metadata"])["layers"] == {
        "blocks.0.attn.k": {"format": "float8_e4m3fn"},
        "blocks.0.attn.q": {"format": "float8_e4m3fn"},
    }
    assert torch.equal(load_weight(index.tensors[Q]), fp8.value(stored, Q, "comfy_quant"))


def test_shards_giving_one_layer_two_formats_are_refused(tmp_path):
    stored, _ = fp8.scaled(tensors(), [Q], "comfy_quant")
    save_sharded(stored, str(tmp_path / "dir"), shards=2)
    for shard, fmt in zip(sorted((tmp_path / "dir").glob("*.safetensors")), FORMATS, strict=True):
        part = {k: v for k, v in stored.items() if k in _keys(shard)}
        text = json.dumps({"layers": {"blocks.0.attn.q": {"format": fmt}}})
        fp8.save(part, shard, {"_quantization_metadata": text})
    with pytest.raises(CheckpointFormatError) as error:
        index_checkpoint(str(tmp_path / "dir"))
    assert str(error.value) == (
        f"{tmp_path / 'dir'}: _quantization_metadata differs between shards for layer "
        "'blocks.0.attn.q' (re-save the checkpoint with ComfyUI)"
    )


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def test_plain_fp8_without_scales_reads_as_stored(tmp_path):
    stored = {**tensors(), Q: tensors()[Q].to(torch.float8_e4m3fn)}
    index = index_checkpoint(fp8.save(stored, tmp_path / "m.safetensors"))
    assert index.fp8.convention is None
    assert torch.equal(load_weight(index.tensors[Q]), stored[Q].float())


def _refused(tmp_path, stored, metadata=None):
    path = fp8.save(stored, tmp_path / "bad.safetensors", metadata)
    with pytest.raises(CheckpointFormatError) as error:
        index_checkpoint(path)
    assert error.value.path == path
    return error.value


@pytest.mark.parametrize("shape", [(2,), (8, 2), (1, 8)])
def test_a_scale_of_neither_layout_is_refused(tmp_path, shape):
    stored, _ = fp8.scaled(tensors(), [Q], "scaled_fp8")
    stored["blocks.0.attn.q.scale_weight"] = torch.ones(shape)
    error = _refused(tmp_path, stored)
    assert error.key == "blocks.0.attn.q.scale_weight"
    assert f"has shape {list(shape)}, which is neither one value nor one per row of the " in str(
        error
    )


def test_an_integer_scale_is_refused(tmp_path):
    stored, _ = fp8.scaled(tensors(), [Q], "lightx2v", per_row=True)
    stored["blocks.0.attn.q.weight_scale"] = torch.ones(8, 1, dtype=torch.int32)
    error = _refused(tmp_path, stored)
    assert "is stored as I32, not a float32/16 scale" in str(error)


def test_a_marker_without_scales_is_refused(tmp_path):
    stored = {**tensors(), "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    error = _refused(tmp_path, stored)
    assert error.key == "scaled_fp8"
    assert "has the 'scaled_fp8' marker but no <layer>.scale_weight tensors" in str(error)


def test_scales_without_the_marker_are_refused(tmp_path):
    stored, _ = fp8.scaled(tensors(), [Q], "scaled_fp8")
    del stored["scaled_fp8"]
    error = _refused(tmp_path, stored)
    assert error.key == "blocks.0.attn.q.scale_weight"
    assert "no 'scaled_fp8' marker, so ComfyUI would load its fp8 weights unscaled" in str(error)


def test_a_scale_beside_a_bf16_weight_is_refused(tmp_path):
    stored, _ = fp8.scaled(tensors(), [Q], "scaled_fp8")
    stored[Q] = tensors()[Q].bfloat16()
    error = _refused(tmp_path, stored)
    assert error.key == Q
    assert "has a scale 'blocks.0.attn.q.scale_weight' but is stored as BF16, not fp8" in str(error)


def test_a_scale_without_its_weight_is_refused(tmp_path):
    stored, _ = fp8.scaled(tensors(), [Q], "scaled_fp8")
    stored["blocks.9.x.scale_weight"] = torch.tensor(1.0)
    error = _refused(tmp_path, stored)
    assert error.key == "blocks.9.x.scale_weight"
    assert "scale 'blocks.9.x.scale_weight' has no weight 'blocks.9.x.weight'" in str(error)


def test_a_quantized_layer_without_its_scale_is_refused(tmp_path):
    stored, metadata = fp8.scaled(tensors(), [Q], "comfy_quant")
    del stored["blocks.0.attn.q.weight_scale"]
    error = _refused(tmp_path, stored, metadata)
    assert error.key == Q
    assert "has no scale 'blocks.0.attn.q.weight_scale'" in str(error)


@pytest.mark.parametrize(
    "text",
    ["not json", json.dumps({"layers": []}), json.dumps({"layers": {"a": "float8_e4m3fn"}})],
)
def test_malformed_quantization_metadata_is_refused(tmp_path, text):
    stored, _ = fp8.scaled(tensors(), [Q], "comfy_quant")
    error = _refused(tmp_path, stored, {"_quantization_metadata": text})
    assert "'_quantization_metadata' is not a JSON object with a 'layers' object" in str(error)


def test_a_quantization_format_other_than_fp8_is_refused(tmp_path):
    stored, _ = fp8.scaled(tensors(), [Q], "comfy_quant")
    text = json.dumps({"layers": {"blocks.0.attn.q": {"format": "nvfp4"}}})
    error = _refused(tmp_path, stored, {"_quantization_metadata": text})
    assert error.key == Q
    assert "gives layer 'blocks.0.attn.q' the format 'nvfp4'; loraforge reads" in str(error)


def comfy_config(fmt: str = "float8_e4m3fn") -> torch.Tensor:
    """A per-layer ``<layer>.comfy_quant`` tensor as ComfyUI saves it: its JSON as uint8."""
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def test_per_layer_comfy_quant_tensors_without_header_metadata_are_comfy_quant(tmp_path):
    # ComfyUI's own saves carry the config per layer; the header metadata is optional.
    stored, _ = fp8.scaled(tensors(), [Q], "comfy_quant")
    stored["blocks.0.attn.q.comfy_quant"] = comfy_config()
    index = index_checkpoint(fp8.save(stored, tmp_path / "m.safetensors"))
    assert index.fp8.convention == "comfy_quant"
    assert index.fp8.scales == {Q: "blocks.0.attn.q.weight_scale"}
    assert index.fp8.companions["blocks.0.attn.q.comfy_quant"] == (
        "quantization config (bookkeeping, not a weight)"
    )
    assert torch.equal(load_weight(index.tensors[Q]), fp8.value(stored, Q, "comfy_quant"))


def test_a_comfy_quant_layer_whose_weight_is_not_fp8_is_refused(tmp_path):
    stored = tensors()
    stored[Q] = torch.ones(8, 4, dtype=torch.int8)
    stored["blocks.0.attn.q.weight_scale"] = torch.tensor(1.0)
    stored["blocks.0.attn.q.comfy_quant"] = comfy_config("int8_tensorwise")
    error = _refused(tmp_path, stored, None)
    assert error.key == Q
    assert "has a scale 'blocks.0.attn.q.weight_scale' but is stored as I8, not fp8" in str(error)


def test_a_malformed_shard_metadata_is_refused_in_one_line(tmp_path):
    stored, _ = fp8.scaled(tensors(), [Q], "comfy_quant")
    save_sharded(stored, str(tmp_path / "dir"), shards=2)
    good = json.dumps({"layers": {"blocks.0.attn.q": {"format": "float8_e4m3fn"}}})
    shards = sorted((tmp_path / "dir").glob("*.safetensors"))
    for shard, text in zip(shards, ("{", good), strict=True):  # the first one unreadable
        part = {k: v for k, v in stored.items() if k in _keys(shard)}
        fp8.save(part, shard, {"_quantization_metadata": text})
    with pytest.raises(CheckpointFormatError, match="is not a JSON object with a 'layers'"):
        index_checkpoint(str(tmp_path / "dir"))
