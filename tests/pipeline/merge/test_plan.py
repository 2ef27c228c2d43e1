"""Merge planning from headers (plain data in, plain data out) and the pure ``merge`` stage."""

from loraforge.pipeline.io.layout import OutputEntry
from loraforge.pipeline.io.reader import CheckpointIndex, TensorInfo
from loraforge.pipeline.lora.adapter_config import PeftConfig
from loraforge.pipeline.lora.inputs import LoraInput
from loraforge.pipeline.lora.keys import LoraMapping, LoraPatch, Unmatched, map_lora
from loraforge.pipeline.lora.patches import PatchRef
from loraforge.pipeline.merge.options import MergeOptions
from loraforge.pipeline.merge.plan import plan_merge


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


def test_kinds_follow_the_output_dtype():
    plan = plan_merge(BASE, [], MergeOptions(output_dtype="fp32"))
    assert [(t.key, t.kind, t.out_dtype) for t in plan.tasks] == [
        ("a.bias", "cast", "F32"),
        ("a.weight", "cast", "F32"),
        ("b.weight", "copied", "F32"),
        ("c.weight", "cast", "F32"),
        ("ids.weight", "copied", "I32"),
        ("steps", "copied", "I64"),
    ]
    assert plan.unmatched == []
    plan = plan_merge(BASE, [], MergeOptions(output_dtype="fp16"))
    assert {t.key: (t.kind, t.out_dtype) for t in plan.tasks}["a.weight"] == ("cast", "F16")
    assert {t.key: (t.kind, t.out_dtype) for t in plan.tasks}["steps"] == ("copied", "I64")


def test_merged_tensors_take_the_output_dtype():
    one = lora("one", {"b.diff": ("F32", (8, 4))})
    tasks = {t.key: t for t in plan_merge(BASE, [one], MergeOptions()).tasks}
    assert (tasks["b.weight"].kind, tasks["b.weight"].out_dtype) == ("merged", "BF16")
    assert tasks["b.weight"].entry == OutputEntry("b.weight", "BF16", (8, 4))
    assert tasks["b.weight"].name == "merged-b.weight"
    assert tasks["steps"].name == "copied-steps"


def test_factor_is_strength_times_alpha_times_scale():
    peft = PeftConfig(r=2, lora_alpha=6.0)  # scale 6 / 2 = 3 for the low-rank pair
    idx = index("p", {"a.lora_B": ("F32", (8, 2)), "a.lora_A": ("F32", (2, 4))})
    shapes = {k: i.shape for k, i in idx.tensors.items()}
    mapping = map_lora(shapes, {k: i.shape for k, i in BASE.tensors.items()}, peft_config=peft)
    lowrank = LoraInput("p", "p", 0.25, idx, mapping, None)
    diff = lora("d", {"b.diff": ("F32", (8, 4)), "a.diff_b": ("F16", (8,))}, strength=-1.5)
    plan = plan_merge(BASE, [lowrank, diff], MergeOptions(alpha=0.5))
    factors = {(t.key, p.lora, p.kind): p.factor for t in plan.tasks for p in t.patches}
    assert factors == {
        ("a.weight", 0, "lowrank"): 0.25 * 0.5 * 3.0,
        ("a.bias", 1, "diff"): -1.5 * 0.5 * 1.0,
        ("b.weight", 1, "diff"): -1.5 * 0.5 * 1.0,
    }


def test_direct_mapping_and_patch_tensors():
    idx = index(
        "x",
        {"u": ("F32", (8, 2)), "d": ("BF16", (2, 4)), "junk": ("F32", (1,))},
    )
    mapping = LoraMapping(
        patches=[LoraPatch("a.weight", "lowrank", "u", "d", None, 2.0, 2)],
        unmatched=[Unmatched("junk", "not a LoRA key name")],
    )
    plan = plan_merge(BASE, [LoraInput("x", "x", 1.5, idx, mapping, None)], MergeOptions())
    (task,) = [t for t in plan.tasks if t.kind == "merged"]
    (patch,) = task.patches
    assert patch == PatchRef(0, "lowrank", 3.0, idx.tensors["u"], idx.tensors["d"], None)
    assert patch.tensors == [idx.tensors["u"], idx.tensors["d"]]
    assert task.read_bytes == 8 * 4 * 2 + 8 * 2 * 4 + 2 * 4 * 2
    assert plan.unmatched == [[Unmatched("junk", "not a LoRA key name")]]


def test_unusable_patches_join_the_mappings_own_unmatched_sorted():
    bad = lora(
        "bad",
        {
            "steps.diff_b": ("F32", (3,)),  # would patch "steps.bias", which is not there
            "ids.diff": ("F32", (8, 4)),
            "a.lora_up.weight": ("F32", (8, 2)),  # up without down
            "b.diff": ("I8", (8, 4)),
        },
    )
    plan = plan_merge(BASE, [bad], MergeOptions())
    assert [(u.lora_key, u.reason) for u in plan.unmatched[0]] == [
        ("a.lora_up.weight", "up without down"),
        ("b.diff", "b.diff is I8, not a float tensor"),
        ("ids.diff", "targets ids.weight, which is I32 and cannot be patched"),
        ("steps.diff_b", "targets no base tensor"),
    ]
    assert {t.key: t.kind for t in plan.tasks} == {
        "a.bias": "copied",
        "a.weight": "copied",
        "b.weight": "cast",
        "c.weight": "copied",
        "ids.weight": "copied",
        "steps": "copied",
    }


def test_read_and_total_bytes():
    one = lora("one", {"a.diff": ("F32", (8, 4)), "c.diff": ("F16", (8, 4))})
    plan = plan_merge(BASE, [one], MergeOptions())
    read = {t.key: t.read_bytes for t in plan.tasks}
    assert read == {
        "a.bias": 8 * 2,
        "a.weight": 8 * 4 * 2 + 8 * 4 * 4,
        "b.weight": 8 * 4 * 4,
        "c.weight": 8 * 4 * 2 + 8 * 4 * 2,
        "ids.weight": 8 * 4 * 4,
        "steps": 3 * 8,
    }
    assert plan.total_bytes == sum(read.values())
    assert plan_merge(BASE, [], MergeOptions()).total_bytes == 16 + 64 + 128 + 64 + 128 + 24
