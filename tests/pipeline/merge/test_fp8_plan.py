"""Planning a scaled-fp8 merge output from headers alone: which tensors are quantized, which
scale and marker entries exist before anything is computed (plain data, no files)."""

import pytest

from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.io.fp8 import find_layout
from loraforge.pipeline.io.layout import OutputEntry
from loraforge.pipeline.io.reader import CheckpointIndex, TensorInfo, with_scales
from loraforge.pipeline.merge.options import MergeOptions
from loraforge.pipeline.merge.plan import block_linear, plan_merge

FP8 = MergeOptions(output_dtype="fp8_e4m3fn")


def index(tensors: dict, metadata=None) -> CheckpointIndex:
    infos = {
        k: TensorInfo(k, "b.safetensors", code, shape, 0) for k, (code, shape) in tensors.items()
    }
    return with_scales(CheckpointIndex("b.safetensors", "safetensors", infos, {}), metadata or {})


@pytest.mark.parametrize(
    ("key", "shape", "quantized"),
    [
        ("blocks.3.self_attn.q.weight", (8, 8), True),  # Wan
        ("transformer_blocks.0.img_mlp.net.0.proj.weight", (8, 8), True),  # Qwen-Image
        ("double_blocks.1.img_attn.qkv.weight", (8, 8), True),  # Flux
        ("model.layers.11.mlp.down_proj.weight", (8, 8), True),
        ("blocks.3.self_attn.q.bias", (8,), False),
        ("blocks.3.norm_q.weight", (8, 8), False),
        ("blocks.0.img_emb.proj.weight", (8, 8), False),
        ("text_embedding.0.weight", (8, 8), False),
        ("head.head.weight", (8, 8), False),
        ("patch_embedding.weight", (8, 4, 1, 2, 2), False),
        ("blocks.3.modulation", (1, 6, 8), False),
    ],
)
def test_linear_layers_of_the_blocks_are_what_a_bf16_base_quantizes(key, shape, quantized):
    assert block_linear(key, TensorInfo(key, "f", "BF16", shape)) is quantized


def test_a_bf16_base_plans_a_scale_per_linear_and_the_marker():
    base = index({"blocks.0.q.weight": ("BF16", (8, 4)), "blocks.0.q.bias": ("BF16", (8,))})
    plan = plan_merge(base, [], FP8)
    assert plan.entries == [
        OutputEntry("blocks.0.q.bias", "BF16", (8,)),
        OutputEntry("blocks.0.q.scale_weight", "F32", ()),
        OutputEntry("blocks.0.q.weight", "F8_E4M3", (8, 4)),
        OutputEntry("scaled_fp8", "F8_E4M3", (0,)),
    ]
    parts = {t.key: (t.kind, t.part, t.quantized) for t in plan.tasks}
    assert parts == {
        "blocks.0.q.bias": ("copied", "value", False),
        "blocks.0.q.scale_weight": ("cast", "scale", True),
        "blocks.0.q.weight": ("cast", "value", True),
        "scaled_fp8": ("cast", "marker", False),
    }
    marker = next(t for t in plan.tasks if t.part == "marker")
    assert marker.read_bytes == 0
    assert plan.metadata == {}


def test_an_unpatched_scaled_weight_keeps_its_bytes_and_its_scale():
    base = index(
        {
            "blocks.0.q.weight": ("F8_E4M3", (8, 4)),
            "blocks.0.q.scale_weight": ("F32", ()),
            "scaled_fp8": ("F8_E4M3", (0,)),
        }
    )
    plan = plan_merge(base, [], FP8)
    assert {t.key: t.kind for t in plan.tasks} == dict.fromkeys(
        ["blocks.0.q.scale_weight", "blocks.0.q.weight", "scaled_fp8"], "copied"
    )


def test_a_scaled_base_quantizes_only_its_scaled_weights_and_carries_metadata():
    text = '{"layers": {"blocks.0.q": {"format": "float8_e4m3fn"}}}'
    base = index(
        {
            "blocks.0.q.weight": ("F8_E5M2", (8, 4)),
            "blocks.0.q.weight_scale": ("F32", ()),
            "blocks.0.k.weight": ("BF16", (8, 4)),
        },
        {"_quantization_metadata": text},
    )
    plan = plan_merge(base, [], FP8)
    # e5m2 in, e4m3fn out: requantized (its scale recomputed); the bf16 weight stays bf16.
    kinds = {t.key: (t.kind, t.part, t.out_dtype) for t in plan.tasks}
    assert kinds == {
        "blocks.0.k.weight": ("copied", "value", "BF16"),
        "blocks.0.q.weight": ("cast", "value", "F8_E4M3"),
        "blocks.0.q.weight_scale": ("cast", "scale", "F32"),
    }
    assert plan.metadata == {"_quantization_metadata": text}


def test_a_non_fp8_output_drops_the_scaled_bookkeeping():
    base = index(
        {
            "blocks.0.q.weight": ("F8_E4M3", (8, 4)),
            "blocks.0.q.scale_weight": ("F32", ()),
            "scaled_fp8": ("F8_E4M3", (0,)),
        }
    )
    layout = find_layout("b.safetensors", base.tensors, {})
    plan = plan_merge(base, [], MergeOptions(output_dtype="bf16"))
    assert [(t.key, t.kind) for t in plan.tasks] == [("blocks.0.q.weight", "cast")]
    assert plan.dropped == {k: f"{v}; the output is not fp8" for k, v in layout.companions.items()}


def test_a_bf16_output_drops_per_layer_comfy_quant_configs():
    # Kept beside a bf16 weight, ComfyUI would load that weight as fp8 wanting a scale.
    base = index(
        {
            "blocks.0.q.weight": ("F8_E4M3", (8, 4)),
            "blocks.0.q.weight_scale": ("F32", ()),
            "blocks.0.q.comfy_quant": ("U8", (27,)),
        }
    )
    plan = plan_merge(base, [], MergeOptions(output_dtype="bf16"))
    assert [(t.key, t.kind) for t in plan.tasks] == [("blocks.0.q.weight", "cast")]
    assert plan.dropped["blocks.0.q.comfy_quant"] == (
        "quantization config (bookkeeping, not a weight); the output is not fp8"
    )


def test_an_fp8_pytorch_output_of_a_header_metadata_base_is_refused():
    # A .pt file has no header: ComfyUI would load its fp8 weights without their scales.
    text = '{"layers": {"blocks.0.q": {"format": "float8_e4m3fn"}}}'
    base = index(
        {"blocks.0.q.weight": ("F8_E4M3", (8, 4)), "blocks.0.q.weight_scale": ("F32", ())},
        {"_quantization_metadata": text},
    )
    options = MergeOptions(output_dtype="fp8_e4m3fn", output_format="pytorch")
    with pytest.raises(UsageError) as error:
        plan_merge(base, [], options)
    assert str(error.value) == (
        "b.safetensors: --output-dtype fp8_e4m3fn keeps this base's quantization config in the "
        "safetensors header (_quantization_metadata), which a PyTorch file cannot hold "
        "(use --output-format safetensors)"
    )


def test_an_e5m2_layer_labelled_by_a_config_tensor_is_refused_for_fp8_output():
    # Its .comfy_quant tensor says float8_e5m2; requantized to e4m3fn, ComfyUI would misread it.
    base = index(
        {
            "blocks.0.q.weight": ("F8_E5M2", (8, 4)),
            "blocks.0.q.weight_scale": ("F32", ()),
            "blocks.0.q.comfy_quant": ("U8", (25,)),
        }
    )
    with pytest.raises(UsageError) as error:
        plan_merge(base, [], FP8)
    assert str(error.value) == (
        "b.safetensors: tensor 'blocks.0.q.weight': is F8_E5M2, and its layer's quantization "
        "config tensor 'blocks.0.q.comfy_quant' says so; --output-dtype fp8_e4m3fn cannot "
        "relabel it (merge into bf16, or re-save the base as float8_e4m3fn)"
    )


def test_the_scale_of_fp8_bytes_kept_as_they_are_reads_nothing():
    base = index({"blocks.0.q.weight": ("F8_E4M3", (8, 4))})
    tasks = {t.key: t for t in plan_merge(base, [], FP8).tasks}
    scale = tasks["blocks.0.q.scale_weight"]
    assert (scale.kind, scale.part, scale.quantized) == ("cast", "scale", False)
    assert scale.read_bytes == 0  # it writes 1 without opening the weight
    assert tasks["blocks.0.q.weight"].kind == "copied"
