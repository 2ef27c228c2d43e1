"""Planning a scaled-fp8 merge output from headers alone: which tensors are quantized, which
scale and marker entries exist before anything is computed (plain data, no files)."""

import pytest

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
