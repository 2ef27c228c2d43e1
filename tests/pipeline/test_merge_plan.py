"""Merge planning from headers (plain data in, plain data out) and the pure ``merge`` stage."""

from loraforge.pipeline.lora_keys import Unmatched, map_lora
from loraforge.pipeline.merge_inputs import LoraInput
from loraforge.pipeline.merge_plan import plan_merge
from loraforge.pipeline.options import MergeOptions
from loraforge.pipeline.reader import CheckpointIndex, TensorInfo


def index(path, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> CheckpointIndex:
    infos = {k: TensorInfo(k, path, code, shape, 0) for k, (code, shape) in tensors.items()}
    return CheckpointIndex(path, "safetensors", infos, {})


BASE = index(
    "base.safetensors",
    {
        "a.weight": ("BF16", (8, 4)),
        "a.bias": ("BF16", (8,)),
        "b.weight": ("F32", (8, 4)),
        "steps": ("I64", (3,)),
        "ids.weight": ("I32", (8, 4)),
        "c.weight": ("BF16", (8, 4)),
    },
)


def lora(path, tensors, strength=1.0, alphas=None) -> LoraInput:
    idx = index(path, tensors)
    shapes = {k: i.shape for k, i in idx.tensors.items()}
    base_shapes = {k: i.shape for k, i in BASE.tensors.items()}
    mapping = map_lora(shapes, base_shapes, alphas=alphas, source=path)
    return LoraInput(path, path, strength, idx, mapping, None)


def test_tasks_kinds_factors_and_output_entries():
    first = lora(
        "one",
        {
            "a.lora_up.weight": ("F32", (8, 2)),
            "a.lora_down.weight": ("F32", (2, 4)),
            "a.alpha": ("F32", ()),
            "a.diff_b": ("BF16", (8,)),
        },
        strength=0.5,
        alphas={"a.alpha": 4.0},
    )
    second = lora("two", {"a.lora_B": ("F16", (8, 1)), "a.lora_A": ("F16", (1, 4))}, strength=-2)
    plan = plan_merge(BASE, [first, second], MergeOptions(alpha=3.0))
    tasks = {t.key: t for t in plan.tasks}
    assert [t.key for t in plan.tasks] == sorted(BASE.tensors)
    assert {k: t.kind for k, t in tasks.items()} == {
        "a.weight": "merged",
        "a.bias": "merged",
        "b.weight": "cast",
        "c.weight": "copied",
        "ids.weight": "copied",
        "steps": "copied",
    }
    weight = tasks["a.weight"]
    assert [(p.lora, p.kind, p.factor) for p in weight.patches] == [
        (0, "lowrank", 0.5 * 3.0 * (4.0 / 2)),
        (1, "lowrank", -2 * 3.0 * 1.0),
    ]
    assert weight.patches[0].up.key == "a.lora_up.weight" and weight.patches[0].diff is None
    assert weight.name == "merged-a.weight"
    assert tasks["a.bias"].patches[0].diff.key == "a.diff_b"
    entries = {e.name: (e.dtype, e.shape) for e in plan.entries}
    assert entries["b.weight"] == ("BF16", (8, 4)) and entries["steps"] == ("I64", (3,))
    assert plan.unmatched == [[], []]
    assert weight.read_bytes == 8 * 4 * 2 + (8 * 2 + 2 * 4) * 4 + (8 + 4) * 2


def test_patches_to_non_float_tensors_or_from_non_float_factors_are_unmatched():
    bad = lora(
        "bad",
        {
            "ids.lora_up.weight": ("F32", (8, 2)),
            "ids.lora_down.weight": ("F32", (2, 4)),
            "c.lora_up.weight": ("I8", (8, 2)),
            "c.lora_down.weight": ("F32", (2, 4)),
            "a.diff": ("BF16", (8, 4)),
        },
    )
    plan = plan_merge(BASE, [bad], MergeOptions(output_dtype="fp32"))
    assert {t.key: t.kind for t in plan.tasks if t.kind == "merged"} == {"a.weight": "merged"}
    reasons = {u.lora_key: u.reason for u in plan.unmatched[0]}
    assert reasons == {
        "c.lora_down.weight": "c.lora_up.weight is I8, not a float tensor",
        "c.lora_up.weight": "c.lora_up.weight is I8, not a float tensor",
        "ids.lora_down.weight": "targets ids.weight, which is I32 and cannot be patched",
        "ids.lora_up.weight": "targets ids.weight, which is I32 and cannot be patched",
    }
    assert plan.unmatched[0] == sorted(plan.unmatched[0], key=lambda u: u.lora_key)
    assert isinstance(plan.unmatched[0][0], Unmatched)
    assert {t.key: t.kind for t in plan.tasks}["c.weight"] == "cast"
