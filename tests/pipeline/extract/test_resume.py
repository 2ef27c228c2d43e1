"""The reuse decision for one extraction task, from markers and fingerprints as plain dicts."""

import pytest

from loraforge.pipeline.extract.plan import ExtractTask
from loraforge.pipeline.extract.resume import Decision, decide, input_changes
from loraforge.pipeline.io.reader import TensorInfo

KEY = "blocks.0.q.weight"


def task(kind="lowrank", rank=16) -> ExtractTask:
    source = TensorInfo(KEY, "/s/model.safetensors", "BF16", (64, 32), 8)
    target = TensorInfo(KEY, "/t/model.safetensors", "BF16", (64, 32), 8)
    outputs = {"diff": "diffusion_model.blocks.0.q.diff"} if kind == "diff" else {}
    return ExtractTask(
        KEY, kind, (64, 32), rank if kind == "lowrank" else 0, source, target, outputs
    )


def side(size=1000, sample="aa") -> dict:
    return {
        "file": "model.safetensors",
        "size": size,
        "header_sha256": "h" * 64,
        "dtype": "BF16",
        "shape": [64, 32],
        "sample_sha256": sample,
    }


def fingerprint(task_kind="lowrank", **changes) -> dict:
    """Shaped like ``extract_fingerprint``'s for a ``task_kind`` task (the kernel only for
    low-rank ones), with ``changes`` applied."""
    fp = {"loraforge": "0.1.0", "key": KEY, "kind": task_kind, "source": side(), "target": side()}
    if task_kind == "lowrank":
        fp["kernel"] = {"method": "randomized", "oversample": 16, "n_iter": 2}
    fp.update(changes)
    return fp


def marker(fp: dict, kind="lowrank", rank=16) -> dict:
    m = {"kind": kind, "fingerprint": fp}
    if kind == "lowrank":
        m["rank"] = rank
    return m


def test_no_marker_means_compute_without_a_reason():
    assert decide(task(), None, fingerprint()) == Decision(False, None, None)


@pytest.mark.parametrize("kind", ["lowrank", "diff"])
def test_matching_fingerprint_is_reused(kind):
    fp = fingerprint(kind)
    assert decide(task(kind), marker(fp, kind), fingerprint(kind)) == Decision(True, None, None)


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("source", side(size=1001), "source tensor changed"),
        ("target", side(sample="bb"), "target tensor changed"),
        ("kernel", {"method": "full", "oversample": 16, "n_iter": 2}, "kernel parameters changed"),
        ("loraforge", "0.2.0", "loraforge version changed"),
        ("kind", "diff", "planned kind changed"),
        ("key", "blocks.1.q.weight", "key changed"),
    ],
)
def test_each_changed_field_names_its_reason(field, value, reason):
    stored = marker(fingerprint(**{field: value}))
    assert decide(task(), stored, fingerprint()) == Decision(False, reason)


def test_several_changes_are_named_in_fingerprint_order():
    stored = marker(fingerprint(kernel={"method": "full"}, source=side(size=1), loraforge="0"))
    assert decide(task(), stored, fingerprint()).reason == (
        "loraforge version changed, source tensor changed, kernel parameters changed"
    )


def test_marker_without_a_fingerprint_changed_everything():
    assert decide(task(), {"kind": "lowrank", "rank": 16}, fingerprint()) == Decision(
        False,
        "loraforge version changed, key changed, planned kind changed, source tensor changed, "
        "target tensor changed, kernel parameters changed",
    )


def test_fields_only_the_old_fingerprint_has_are_ignored():
    stored = marker(fingerprint("diff", kernel={"method": "full"}), "diff")
    assert decide(task("diff"), stored, fingerprint("diff")) == Decision(True)


def test_larger_stored_rank_is_sliced():
    stored = marker(fingerprint(), rank=32)
    assert decide(task(rank=16), stored, fingerprint()) == Decision(True, None, 32)


def test_equal_stored_rank_is_reused_as_is():
    assert decide(task(rank=16), marker(fingerprint(), rank=16), fingerprint()) == Decision(True)


def test_smaller_stored_rank_is_recomputed():
    stored = marker(fingerprint(), rank=8)
    assert decide(task(rank=16), stored, fingerprint()) == Decision(
        False, "stored rank 8 < requested 16"
    )
    no_rank = {"kind": "lowrank", "fingerprint": fingerprint()}
    assert decide(task(rank=16), no_rank, fingerprint()) == Decision(
        False, "stored rank 0 < requested 16"
    )


def test_a_changed_fingerprint_wins_over_a_usable_rank():
    stored = marker(fingerprint(target=side(size=1)), rank=64)
    assert decide(task(rank=16), stored, fingerprint()) == Decision(False, "target tensor changed")


def test_rank_is_not_checked_for_other_stored_kinds():
    fp = fingerprint()
    assert decide(task(rank=16), {"kind": "unchanged", "fingerprint": fp}, fp) == Decision(True)


def model(path, files) -> dict:
    return {"path": path, "format": "safetensors", "files": files}


def manifest(source=None, target=None, kernel=None) -> dict:
    files = {"a.safetensors": {"size": 10, "header_sha256": "x"}}
    return {
        "command": "extract",
        "kernel": kernel or {"method": "randomized", "rank": 32, "oversample": 16, "n_iter": 2},
        "inputs": {
            "source": source or model("/s", files),
            "target": target or model("/t", dict(files)),
        },
    }


@pytest.mark.parametrize("previous", [None, {}])
def test_no_previous_run_no_notes(previous):
    assert input_changes(previous, manifest()) == []


def test_same_inputs_no_notes():
    assert input_changes(manifest(), manifest()) == []


def test_a_changed_file_is_named():
    now = manifest(source=model("/s", {"a.safetensors": {"size": 11, "header_sha256": "x"}}))
    assert input_changes(manifest(), now) == ["source model changed (a.safetensors)"]


def test_added_removed_and_changed_files_are_named_sorted():
    before = model(
        "/t",
        {
            "c.safetensors": {"size": 1},
            "a.safetensors": {"size": 1},
            "keep.safetensors": {"size": 1},
        },
    )
    after = model(
        "/t",
        {
            "b.safetensors": {"size": 1},
            "a.safetensors": {"size": 2},
            "keep.safetensors": {"size": 1},
        },
    )
    notes = input_changes(manifest(target=before), manifest(target=after))
    assert notes == ["target model changed (a.safetensors, b.safetensors, c.safetensors)"]


def test_a_moved_model_with_the_same_files_names_the_old_path():
    files = {"a.safetensors": {"size": 10, "header_sha256": "x"}}
    notes = input_changes(manifest(), manifest(source=model("/elsewhere", files)))
    assert notes == ["source model changed (/s)"]


def test_a_side_the_previous_run_did_not_record_is_not_a_change():
    previous = manifest()
    del previous["inputs"]["target"]
    assert input_changes(previous, manifest()) == []
    assert input_changes({"kernel": manifest()["kernel"]}, manifest()) == []


def test_kernel_change_is_shown_before_and_after():
    before = manifest(kernel={"method": "randomized", "rank": 8})
    after = manifest(kernel={"method": "full", "rank": 8})
    assert input_changes(before, after) == [
        "kernel parameters changed: {'method': 'randomized', 'rank': 8} → "
        "{'method': 'full', 'rank': 8}"
    ]


def test_every_note_in_order():
    before = manifest(kernel={"rank": 4})
    changed = {"a.safetensors": {"size": 99, "header_sha256": "x"}}
    after = manifest(model("/s", changed), model("/t", changed), {"rank": 8})
    assert input_changes(before, after) == [
        "source model changed (a.safetensors)",
        "target model changed (a.safetensors)",
        "kernel parameters changed: {'rank': 4} → {'rank': 8}",
    ]
