"""The output's layout from plain numbers: shards, file names, LightX2V's suffix rule."""

import os

import pytest

from loraforge.pipeline.io.layout import (
    OutputEntry,
    index_file_name,
    output_files,
    output_path,
    shard_file_names,
    split_shards,
)


@pytest.mark.parametrize("limit", [None, 0])
def test_split_without_a_limit_is_one_shard_in_order(limit):
    entries = [("b", 10**12), ("a", 5), ("c", 0)]
    assert split_shards(entries, limit) == [["b", "a", "c"]]


def test_split_exact_fit_stays_in_one_shard():
    assert split_shards([("a", 4), ("b", 6), ("c", 10)], 10) == [["a", "b"], ["c"]]


def test_split_overflow_starts_a_new_shard():
    assert split_shards([("a", 4), ("b", 7), ("c", 3)], 10) == [["a"], ["b", "c"]]


def test_split_is_greedy_in_the_given_order():
    assert split_shards([("a", 6), ("b", 6), ("c", 4)], 10) == [["a"], ["b", "c"]]


def test_a_tensor_larger_than_the_limit_gets_its_own_shard():
    entries = [("a", 3), ("big", 25), ("c", 3), ("d", 7)]
    assert split_shards(entries, 10) == [["a"], ["big"], ["c", "d"]]
    assert split_shards([("big", 25), ("a", 3)], 10) == [["big"], ["a"]]
    assert split_shards([("big", 25)], 10) == [["big"]]


@pytest.mark.parametrize("limit", [None, 10])
def test_split_empty_list(limit):
    assert split_shards([], limit) == [[]]


def test_one_shard_keeps_the_name():
    assert shard_file_names("/o/x.safetensors", 1) == ["/o/x.safetensors"]


def test_three_shard_names():
    assert shard_file_names("/o/model.v2.safetensors", 3) == [
        "/o/model.v2-00001-of-00003.safetensors",
        "/o/model.v2-00002-of-00003.safetensors",
        "/o/model.v2-00003-of-00003.safetensors",
    ]


def test_index_file_name():
    assert index_file_name("/o/x.safetensors") == "/o/x.safetensors.index.json"


def test_output_files_single_and_sharded():
    entries = [OutputEntry("a", "F32", (2, 2)), OutputEntry("b", "BF16", (4,))]  # 16 + 8 bytes
    assert output_files("/o/x.safetensors", entries, None) == ["/o/x.safetensors"]
    assert output_files("/o/x.safetensors", entries, 24) == ["/o/x.safetensors"]
    assert output_files("/o/x.safetensors", entries, 23) == [
        "/o/x-00001-of-00002.safetensors",
        "/o/x-00002-of-00002.safetensors",
        "/o/x.safetensors.index.json",
    ]
    assert output_files("/o/x.safetensors", [], 10) == ["/o/x.safetensors"]


@pytest.mark.parametrize(
    "name, fmt, expected",
    [
        ("/o/x", "safetensors", "/o/x.safetensors"),
        ("/o/x.safetensors", "safetensors", "/o/x.safetensors"),
        ("/o/x.pt", "safetensors", "/o/x.pt.safetensors"),
        ("/o/x", "pytorch", "/o/x.pt"),
        ("/o/x.pt", "pytorch", "/o/x.pt"),
        ("/o/x.pth", "pytorch", "/o/x.pth"),
        ("/o/x.bin", "pytorch", "/o/x.bin.pt"),
        ("/o/x.safetensors", "pytorch", "/o/x.safetensors.pt"),
    ],
)
def test_output_path_suffix_rule(name, fmt, expected):
    assert output_path(name, fmt) == expected


def test_output_path_is_absolute_and_expands_home(monkeypatch):
    monkeypatch.setenv("HOME", "/home/tester")
    assert output_path("~/x", "safetensors") == "/home/tester/x.safetensors"
    assert output_path("rel/x.pth", "pytorch") == os.path.join(os.getcwd(), "rel", "x.pth")


@pytest.mark.parametrize(
    "dtype, shape, nbytes",
    [
        ("F32", (3, 4), 48),
        ("BF16", (3, 4), 24),
        ("F16", (5,), 10),
        ("F64", (2,), 16),
        ("I64", (0, 5), 0),
        ("F32", (), 4),
        ("F8_E4M3", (10,), 10),
    ],
)
def test_output_entry_nbytes(dtype, shape, nbytes):
    assert OutputEntry("k", dtype, shape).nbytes == nbytes


# ---- groups: a LoRA weight's up, down and alpha never straddle two shards ----
LORA = [("q.alpha", 2), ("q.diff_b", 4), ("q.lora_down", 6), ("q.lora_up", 6), ("v.alpha", 2)]
Q_WEIGHT = {"q.alpha": "q.weight", "q.lora_down": "q.weight", "q.lora_up": "q.weight"}


def test_without_groups_a_weight_can_be_split():
    assert split_shards(LORA, 12) == [
        ["q.alpha", "q.diff_b", "q.lora_down"],
        ["q.lora_up", "v.alpha"],
    ]


def test_a_group_is_never_split_and_the_order_kept():
    groups = {**Q_WEIGHT, "q.diff_b": "q.bias", "v.alpha": "v.weight"}
    # q.diff_b sits inside q.weight's span (names sort so), so it travels with it
    assert split_shards(LORA, 12, groups) == [
        ["q.alpha", "q.diff_b", "q.lora_down", "q.lora_up"],
        ["v.alpha"],
    ]
    assert split_shards(LORA, 100, groups) == [[name for name, _ in LORA]]


def test_groups_pack_greedily_between_themselves():
    entries = [("a.down", 3), ("a.up", 3), ("b.down", 3), ("b.up", 3), ("c.diff", 5)]
    groups = {"a.down": "a", "a.up": "a", "b.down": "b", "b.up": "b"}
    assert split_shards(entries, 6, groups) == [["a.down", "a.up"], ["b.down", "b.up"], ["c.diff"]]
    assert split_shards(entries, 11, groups) == [["a.down", "a.up"], ["b.down", "b.up", "c.diff"]]
    assert split_shards(entries, 12, groups) == [["a.down", "a.up", "b.down", "b.up"], ["c.diff"]]
    assert split_shards(entries, 17, groups) == [[name for name, _ in entries]]


def test_output_files_count_shards_with_groups():
    entries = [OutputEntry("a.down", "F32", (2,)), OutputEntry("a.up", "F32", (2,))]  # 8 + 8
    assert output_files("/o/x.safetensors", entries, 8) == [
        "/o/x-00001-of-00002.safetensors",
        "/o/x-00002-of-00002.safetensors",
        "/o/x.safetensors.index.json",
    ]
    assert output_files("/o/x.safetensors", entries, 8, {"a.down": "a", "a.up": "a"}) == [
        "/o/x.safetensors"
    ]
