"""Resume of a merge: what changed since the last run, the digest of everything the output
depends on, and whether a marker still vouches for the bytes at its slot."""

import os
import re

import google_crc32c
import pytest
import torch

from loraforge.pipeline import __version__
from loraforge.pipeline.io.layout import OutputEntry, Slot
from loraforge.pipeline.io.reader import CheckpointIndex, TensorInfo
from loraforge.pipeline.lora.inputs import LoraInput
from loraforge.pipeline.lora.keys import map_lora
from loraforge.pipeline.merge.options import MergeOptions
from loraforge.pipeline.merge.plan import plan_merge
from loraforge.pipeline.merge.resume import (
    changes_since,
    components_digest,
    marker_valid,
    merge_components,
)

WHERE = "/o/merged.safetensors.work"


def components(**changes) -> dict:
    c = {
        "versions": {"loraforge": "0.1.0", "torch": "2.4.0", "device": "cpu"},
        "base": {"path": "/b", "files": {"b.safetensors": {"size": 10, "mtime_ns": 1}}},
        "loras": [{"file": "/l.safetensors", "files": {}, "strength": 1.0}],
        "options": {
            "alpha": 1.0,
            "output_dtype": "torch.bfloat16",
            "output_format": "safetensors",
            "max_shard_size": None,
        },
        "tasks": "0" * 64,
    }
    c.update(changes)
    return c


@pytest.mark.parametrize("previous", [None, {}, {"components": None}, {"components": {}}])
def test_no_previous_components_no_changes(previous):
    assert changes_since(previous, components(), WHERE) == []


def test_same_components_no_changes():
    assert changes_since({"components": components()}, components(), WHERE) == []


@pytest.mark.parametrize(
    "field, value, what",
    [
        (
            "versions",
            {"loraforge": "0.1.0", "torch": "2.5.0", "device": "cpu"},
            "loraforge, torch or the device",
        ),
        ("base", {"path": "/b", "files": {}}, "the base model"),
        (
            "loras",
            [{"file": "/l.safetensors", "files": {}, "strength": 0.5}],
            "the LoRAs or their strengths",
        ),
        ("options", {"alpha": 2.0}, "the output options"),
        ("tasks", "1" * 64, "the merge plan"),
    ],
)
def test_each_change_is_named(field, value, what):
    previous = {"components": components(**{field: value})}
    assert changes_since(previous, components(), WHERE) == [
        f"{what} changed since the run that left {WHERE}"
    ]


def test_several_changes_in_one_note_in_a_fixed_order():
    previous = {"components": components(tasks="1", base={}, versions={})}
    assert changes_since(previous, components(), WHERE) == [
        "loraforge, torch or the device, the base model, the merge plan changed since the run "
        f"that left {WHERE}"
    ]


def test_components_digest_is_stable_and_ignores_insertion_order():
    digest = components_digest(components())
    assert re.fullmatch("[0-9a-f]{64}", digest)
    assert components_digest(components()) == digest
    reordered = dict(reversed(list(components().items())))
    reordered["options"] = dict(reversed(list(reordered["options"].items())))
    assert components_digest(reordered) == digest


@pytest.mark.parametrize(
    "change",
    [
        {"versions": {"loraforge": "0.1.0", "torch": "2.4.0", "device": "cuda:0"}},
        {"base": {"path": "/b", "files": {"b.safetensors": {"size": 10, "mtime_ns": 2}}}},
        {"loras": [{"file": "/l.safetensors", "files": {}, "strength": 1.0000001}]},
        {"loras": []},
        {"tasks": "0" * 63 + "1"},
        {"extra": None},
    ],
)
def test_components_digest_is_sensitive_to_any_change(change):
    assert components_digest(components(**change)) != components_digest(components())


def test_components_digest_sees_a_changed_option():
    options = {**components()["options"], "max_shard_size": 5}
    assert components_digest(components(options=options)) != components_digest(components())


def write_file(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def index(path: str, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> CheckpointIndex:
    infos = {k: TensorInfo(k, path, code, shape, 0) for k, (code, shape) in tensors.items()}
    name = os.path.basename(path)
    return CheckpointIndex(path, "safetensors", infos, {name: {"size": 1, "header_sha256": "h"}})


def test_merge_components_and_what_a_change_names(tmp_path):
    base_file = write_file(tmp_path / "base.safetensors", b"base")
    lora_file = write_file(tmp_path / "lora.safetensors", b"lora")
    base = index(base_file, {"a.weight": ("BF16", (8, 4)), "steps": ("I64", (3,))})
    lora_index = index(lora_file, {"a.lora_B": ("F32", (8, 2)), "a.lora_A": ("F32", (2, 4))})
    shapes = {k: i.shape for k, i in lora_index.tensors.items()}
    mapping = map_lora(shapes, {k: i.shape for k, i in base.tensors.items()})

    def run(strength=1.0, alpha=1.0, dev="cpu"):
        lora = LoraInput(lora_file, lora_file, strength, lora_index, mapping, None)
        plan = plan_merge(base, [lora], MergeOptions(alpha=alpha))
        return merge_components(plan, base, [lora], dev)

    first = run()
    mtime = {
        "base.safetensors": os.stat(base_file).st_mtime_ns,
        "lora.safetensors": os.stat(lora_file).st_mtime_ns,
    }
    inode = {
        "base.safetensors": os.stat(base_file).st_ino,
        "lora.safetensors": os.stat(lora_file).st_ino,
    }
    assert first["versions"] == {
        "loraforge": __version__,
        "torch": torch.__version__,
        "device": "cpu",
    }
    assert first["base"] == {
        "path": base_file,
        "files": {
            "base.safetensors": {
                "size": 1,
                "header_sha256": "h",
                "mtime_ns": mtime["base.safetensors"],
                "inode": inode["base.safetensors"],
            }
        },
    }
    assert first["loras"] == [
        {
            "file": lora_file,
            "files": {
                "lora.safetensors": {
                    "size": 1,
                    "header_sha256": "h",
                    "mtime_ns": mtime["lora.safetensors"],
                    "inode": inode["lora.safetensors"],
                }
            },
            "strength": 1.0,
        }
    ]
    assert first["options"] == {
        "alpha": 1.0,
        "output_dtype": "torch.bfloat16",
        "output_format": "safetensors",
        "max_shard_size": None,
    }
    assert re.fullmatch("[0-9a-f]{64}", first["tasks"])
    assert components_digest(run()) == components_digest(first)

    def changes(**kwargs):
        return changes_since({"components": first}, run(**kwargs), WHERE)

    suffix = f" changed since the run that left {WHERE}"
    assert changes(dev="cuda:0") == ["loraforge, torch or the device" + suffix]
    # A strength or alpha changes each patch's factor, so the plan's hash changes too.
    assert changes(strength=0.5) == ["the LoRAs or their strengths, the merge plan" + suffix]
    assert changes(alpha=2.0) == ["the output options, the merge plan" + suffix]
    os.utime(base_file, ns=(0, mtime["base.safetensors"] + 10**9))
    assert changes() == ["the base model" + suffix]
    # A replaced file (new inode) with the old size and modification time is noticed too.
    os.rename(write_file(tmp_path / "other", b"LORA"), lora_file)
    os.utime(base_file, ns=(0, mtime["base.safetensors"]))
    os.utime(lora_file, ns=(0, mtime["lora.safetensors"]))
    assert os.stat(lora_file).st_ino != inode["lora.safetensors"]
    assert changes() == ["the LoRAs or their strengths" + suffix]


DATA = bytes(range(40))
ENTRY = OutputEntry("w", "F32", (2, 3))  # 24 bytes


@pytest.fixture
def slot(tmp_path):
    return Slot(write_file(tmp_path / "out.safetensors.tmp", DATA), 8, ENTRY)


def good_marker(slot) -> dict:
    return {
        "fingerprint": "f" * 64,
        "file": "out.safetensors.tmp",
        "offset": 8,
        "nbytes": 24,
        "crc": google_crc32c.value(DATA[8:32]),
    }


def test_a_matching_marker_is_valid(slot):
    assert marker_valid(good_marker(slot), "f" * 64, slot) is True


def test_no_marker_is_not_valid(slot):
    assert marker_valid(None, "f" * 64, slot) is False


@pytest.mark.parametrize(
    "field, value",
    [
        ("fingerprint", "e" * 64),
        ("file", "other.safetensors.tmp"),
        ("file", None),
        ("offset", 9),
        ("nbytes", 23),
        ("crc", google_crc32c.value(DATA[8:32]) ^ 1),
        ("crc", None),
    ],
)
def test_each_mismatching_field_invalidates(slot, field, value):
    marker = {**good_marker(slot), field: value}
    assert marker_valid(marker, "f" * 64, slot) is False


@pytest.mark.parametrize("field", ["fingerprint", "file", "offset", "nbytes", "crc"])
def test_each_missing_field_invalidates(slot, field):
    marker = good_marker(slot)
    del marker[field]
    assert marker_valid(marker, "f" * 64, slot) is False


def test_a_different_fingerprint_asked_for_invalidates(slot):
    assert marker_valid(good_marker(slot), "e" * 64, slot) is False


def test_changed_bytes_at_the_slot_invalidate(slot):
    marker = good_marker(slot)
    damaged = bytearray(DATA)
    damaged[31] ^= 0xFF
    write_file(slot.file, bytes(damaged))
    assert marker_valid(marker, "f" * 64, slot) is False
    damaged = bytearray(DATA)
    damaged[7] ^= 0xFF  # outside the slot: still valid
    damaged[32] ^= 0xFF
    write_file(slot.file, bytes(damaged))
    assert marker_valid(marker, "f" * 64, slot) is True


def test_a_file_cut_short_invalidates(slot):
    marker = good_marker(slot)
    write_file(slot.file, DATA[:31])
    assert marker_valid(marker, "f" * 64, slot) is False
