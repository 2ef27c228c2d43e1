"""Extraction planning from headers alone: plain ints and strings in, plain data out."""

import pytest

from loraforge.pipeline.extract.options import ExtractOptions, KernelOptions
from loraforge.pipeline.extract.plan import ExtractTask, Skipped, plan_extraction
from loraforge.pipeline.io.reader import CheckpointIndex, TensorInfo

NO_SUFFIX = "no LightX2V name for this suffix (only .weight, .bias, .modulation)"
ND_NOTE = "{}-D tensor stored as a full diff (LightX2V's extractor fails here)"
NO_WEIGHT_NOTE = "large tensor without .weight suffix stored as a diff"


def index(path: str, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> CheckpointIndex:
    infos = {k: TensorInfo(k, path, code, shape, 0) for k, (code, shape) in tensors.items()}
    return CheckpointIndex(path, "safetensors", infos, {})


def plan_one(shape, key="m.weight", dtypes=("BF16", "BF16"), **options):
    source = index("s.safetensors", {key: (dtypes[0], shape)})
    target = index("t.safetensors", {key: (dtypes[1], shape)})
    return plan_extraction(source, target, ExtractOptions(**options))


def only_task(plan) -> ExtractTask:
    assert plan.skipped == []
    (task,) = plan.tasks
    return task


def test_lowrank_from_the_parameter_threshold_on():
    task = only_task(plan_one((64, 32), lowrank_min_params=64 * 32))
    assert (task.kind, task.rank, task.note) == ("lowrank", 32, None)
    task = only_task(plan_one((64, 32), lowrank_min_params=64 * 32 + 1))
    assert (task.kind, task.rank, task.note) == ("diff", 0, None)


def test_lowrank_task_fields_and_names():
    plan = plan_one(
        (64, 48), key="blocks.0.attn.q.weight", kernel=KernelOptions(rank=8), lowrank_min_params=100
    )
    task = only_task(plan)
    assert task.key == "blocks.0.attn.q.weight"
    assert task.kind == "lowrank" and task.shape == (64, 48) and task.rank == 8
    assert task.outputs == {  # alpha = rank: no key in the lightx2v style
        "up": "diffusion_model.blocks.0.attn.q.lora_up.weight",
        "down": "diffusion_model.blocks.0.attn.q.lora_down.weight",
    }
    assert task.name == "lowrank-blocks.0.attn.q.weight"
    assert task.source == TensorInfo(task.key, "s.safetensors", "BF16", (64, 48), 0)
    assert task.target == TensorInfo(task.key, "t.safetensors", "BF16", (64, 48), 0)
    assert task.read_bytes == 2 * 64 * 48 * 2


@pytest.mark.parametrize(
    "shape, rank, expected",
    [((64, 16), 32, 16), ((16, 64), 32, 16), ((64, 48), 8, 8), ((40, 40), 40, 40), ((1, 9), 5, 1)],
)
def test_rank_is_capped_at_the_smaller_dimension(shape, rank, expected):
    task = only_task(plan_one(shape, kernel=KernelOptions(rank=rank), lowrank_min_params=0))
    assert (task.kind, task.rank) == ("lowrank", expected)


@pytest.mark.parametrize(
    "key, shape, name",
    [
        ("blocks.0.q.bias", (8,), "diffusion_model.blocks.0.q.diff_b"),
        ("blocks.0.modulation", (1, 6, 4), "diffusion_model.blocks.0.diff_m"),
        ("norm.weight", (4,), "diffusion_model.norm.diff"),
    ],
)
def test_diff_names(key, shape, name):
    task = only_task(plan_one(shape, key=key))  # default threshold: all small
    assert task.kind == "diff" and task.rank == 0 and task.note is None
    assert task.outputs == {"diff": name}
    assert task.name == f"diff-{key}"


def test_a_small_2d_weight_diff_is_written_as_an_exact_pair_unless_diff_only():
    task = only_task(plan_one((8, 4), key="blocks.0.q.weight"))
    assert task.kind == "diff" and task.outputs == {
        "up": "diffusion_model.blocks.0.q.lora_up.weight",
        "down": "diffusion_model.blocks.0.q.lora_down.weight",
    }
    kept = only_task(plan_one((8, 4), key="blocks.0.q.weight", diff_only=True))
    assert kept.outputs == {"diff": "diffusion_model.blocks.0.q.diff"}


def test_diff_only_stores_large_weights_as_plain_diffs():
    task = only_task(plan_one((64, 32), lowrank_min_params=0, diff_only=True))
    assert (task.kind, task.rank, task.note) == ("diff", 0, None)
    assert task.outputs == {"diff": "diffusion_model.m.diff"}
    task = only_task(plan_one((8, 4, 2, 2), lowrank_min_params=0, diff_only=True))
    assert (task.kind, task.note) == ("diff", None)


@pytest.mark.parametrize("shape", [(16, 4, 2, 2), (1, 6, 32), (64, 4, 2, 2, 20)])
def test_large_nd_tensor_is_a_diff_with_a_note(shape):
    task = only_task(plan_one(shape, key="patch_embedding.weight", lowrank_min_params=100))
    assert task.kind == "diff" and task.rank == 0
    assert task.note == ND_NOTE.format(len(shape))
    assert task.outputs == {"diff": "diffusion_model.patch_embedding.diff"}


def test_small_nd_tensor_has_no_note():
    task = only_task(plan_one((2, 3, 4), key="p.weight", lowrank_min_params=25))
    assert (task.kind, task.note) == ("diff", None)


def test_large_2d_tensor_without_weight_suffix_is_a_diff_with_a_note():
    task = only_task(plan_one((6, 64), key="blocks.0.modulation", lowrank_min_params=100))
    assert task.kind == "diff" and task.note == NO_WEIGHT_NOTE
    assert task.outputs == {"diff": "diffusion_model.blocks.0.diff_m"}


def test_one_dimensional_tensors_are_never_large():
    task = only_task(plan_one((5000,), key="x.bias", lowrank_min_params=1))
    assert (task.kind, task.note) == ("diff", None)
    task = only_task(plan_one((), key="x.weight", lowrank_min_params=0))
    assert (task.kind, task.rank, task.note) == ("diff", 0, None)


@pytest.mark.parametrize("key", ["freqs", "blocks.0.scale", "x.weight_g", "x.bias.0"])
def test_key_without_a_lightx2v_suffix_is_skipped(key):
    plan = plan_one((4, 4), key=key)
    assert plan.tasks == []
    assert plan.skipped == [Skipped(key, NO_SUFFIX)]


def test_key_without_a_suffix_is_skipped_even_when_large():
    plan = plan_one((64, 64), key="freqs", lowrank_min_params=0)
    assert plan.tasks == [] and plan.skipped == [Skipped("freqs", NO_SUFFIX)]


def test_shape_mismatch_and_non_float_are_skipped_with_reasons():
    source = index(
        "s",
        {
            "a.weight": ("BF16", (4, 4)),
            "b.weight": ("F32", (4, 4)),
            "c.weight": ("I64", (4,)),
            "d.weight": ("F32", (3,)),
            "e.weight": ("I32", (2, 2)),
            "f.weight": ("F16", (2,)),
        },
    )
    target = index(
        "t",
        {
            "a.weight": ("BF16", (4, 5)),
            "b.weight": ("I32", (4, 4)),
            "c.weight": ("I64", (4,)),
            "d.weight": ("BF16", ()),
            "e.weight": ("I32", (2, 3)),
            "f.weight": ("F32", (2,)),
        },
    )
    plan = plan_extraction(source, target, ExtractOptions())
    assert plan.skipped == [
        Skipped("a.weight", "shape mismatch: [4, 4] vs [4, 5]"),
        Skipped("b.weight", "not a float tensor (F32/I32)"),
        Skipped("c.weight", "not a float tensor (I64/I64)"),
        Skipped("d.weight", "shape mismatch: [3] vs []"),
        Skipped("e.weight", "shape mismatch: [2, 2] vs [2, 3]"),  # the shape is checked first
    ]
    assert [t.key for t in plan.tasks] == ["f.weight"]  # mixed float dtypes are fine
    assert plan.tasks[0].read_bytes == 2 * 2 + 2 * 4


def test_keys_in_one_model_only_and_sorted_tasks():
    source = index(
        "s", {k: ("F32", (4,)) for k in ("z.bias", "only_s.b.bias", "a.bias", "only_s.a.bias")}
    )
    target = index("t", {k: ("F32", (4,)) for k in ("a.bias", "only_t.bias", "z.bias")})
    plan = plan_extraction(source, target, ExtractOptions())
    assert [t.key for t in plan.tasks] == ["a.bias", "z.bias"]
    assert plan.source_only == ["only_s.a.bias", "only_s.b.bias"]
    assert plan.target_only == ["only_t.bias"]
    assert plan.skipped == []


def test_total_bytes_counts_both_sides_of_planned_tasks_only():
    source = index(
        "s",
        {
            "a.weight": ("BF16", (64, 32)),
            "a.bias": ("F32", (64,)),
            "steps": ("I64", (10,)),
            "freqs": ("F32", (100,)),
            "only.weight": ("F32", (1000,)),
        },
    )
    target = index(
        "t",
        {
            "a.weight": ("F32", (64, 32)),
            "a.bias": ("F16", (64,)),
            "steps": ("I64", (10,)),
            "freqs": ("F32", (100,)),
        },
    )
    options = ExtractOptions(lowrank_min_params=1000)
    plan = plan_extraction(source, target, options)
    assert plan.options is options
    assert [(t.key, t.kind) for t in plan.tasks] == [("a.bias", "diff"), ("a.weight", "lowrank")]
    assert [t.read_bytes for t in plan.tasks] == [64 * 4 + 64 * 2, 64 * 32 * 2 + 64 * 32 * 4]
    assert plan.total_bytes == 64 * 6 + 64 * 32 * 6
    assert [s.key for s in plan.skipped] == ["freqs", "steps"]


def test_empty_checkpoints_plan_nothing():
    plan = plan_extraction(index("s", {}), index("t", {}), ExtractOptions())
    assert (plan.tasks, plan.skipped, plan.source_only, plan.target_only) == ([], [], [], [])
    assert plan.total_bytes == 0
