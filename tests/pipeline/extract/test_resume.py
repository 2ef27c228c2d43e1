"""The reuse decision for one extraction task, from markers and fingerprints as plain dicts;
the CRC-32C and stats a task records for it."""

import google_crc32c
import pytest
import torch
from safetensors.torch import save_file

from loraforge.kernels import precision
from loraforge.pipeline.extract import task as task_module
from loraforge.pipeline.extract.options import ExtractOptions, KernelOptions
from loraforge.pipeline.extract.plan import ExtractTask, plan_extraction
from loraforge.pipeline.extract.resume import (
    Decision,
    decide,
    extract_fingerprint,
    input_changes,
    read_record,
    refreshed_marker,
)
from loraforge.pipeline.extract.task import run_extract_task
from loraforge.pipeline.io.fingerprint import file_stat, stored_crc32c, tensor_crc32c
from loraforge.pipeline.io.reader import TensorInfo, index_checkpoint
from loraforge.pipeline.workdir import WorkDir

KEY = "blocks.0.q.weight"


def task(kind="lowrank", rank=16) -> ExtractTask:
    source = TensorInfo(KEY, "/s/model.safetensors", "BF16", (64, 32), 8)
    target = TensorInfo(KEY, "/t/model.safetensors", "BF16", (64, 32), 8)
    outputs = {"diff": "diffusion_model.blocks.0.q.diff"} if kind == "diff" else {}
    return ExtractTask(
        KEY, kind, (64, 32), rank if kind == "lowrank" else 0, source, target, outputs
    )


def side(dtype="BF16", shape=(64, 32)) -> dict:
    return {"file": "model.safetensors", "dtype": dtype, "shape": list(shape)}


def fingerprint(task_kind="lowrank", **changes) -> dict:
    """Shaped like ``extract_fingerprint``'s for a ``task_kind`` task (the kernel only for
    low-rank ones), with ``changes`` applied."""
    fp = {"loraforge": "0.1.0", "key": KEY, "kind": task_kind, "source": side(), "target": side()}
    if task_kind == "lowrank":
        fp["kernel"] = {"method": "randomized", "oversample": 16, "n_iter": 2}
        fp["device"] = "cpu"
    fp.update(changes)
    return fp


def stat(size=1000, mtime_ns=5, inode=7) -> dict:
    return {"size": size, "mtime_ns": mtime_ns, "inode": inode}


STATS = {"source": stat(inode=7), "target": stat(inode=8)}
CRCS = {"source": 111, "target": 222}


def marker(fp: dict, kind="lowrank", rank=16, inputs=None) -> dict:
    """A marker as ``run_extract_task`` writes it: the files' stats in ``STATS`` and the
    tensors' CRCs in ``CRCS`` unless ``inputs`` says otherwise."""
    m = {"kind": kind, "fingerprint": fp}
    m["inputs"] = inputs or {s: {**STATS[s], "crc32c": CRCS[s]} for s in ("source", "target")}
    if kind == "lowrank":
        m["rank"] = rank
    return m


class Crc:
    """The CRC callable ``decide`` gets: current CRCs by side, and which sides it asked for."""

    def __init__(self, **crcs):
        self.crcs, self.calls = {**CRCS, **crcs}, []

    def __call__(self, side: str) -> int:
        self.calls.append(side)
        return self.crcs[side]


def never(side: str) -> int:
    raise AssertionError(f"the {side} tensor was read")


def check(t, stored, fp, stats=STATS, crc=never) -> Decision:
    """``decide`` with the stats unchanged unless given; reading a tensor fails unless a CRC
    callable is given."""
    return decide(t, stored, fp, stats, crc)


def test_no_marker_means_compute_without_a_reason():
    assert check(task(), None, fingerprint()) == Decision(False, None, None)


@pytest.mark.parametrize("kind", ["lowrank", "diff"])
def test_matching_fingerprint_and_stats_are_reused_without_reading(kind):
    crc = Crc()
    fp = fingerprint(kind)
    assert decide(task(kind), marker(fp, kind), fingerprint(kind), STATS, crc) == Decision(True)
    assert crc.calls == []


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("source", side(dtype="F16"), "source tensor changed"),
        ("target", side(shape=(32, 64)), "target tensor changed"),
        ("kernel", {"method": "full", "oversample": 16, "n_iter": 2}, "kernel parameters changed"),
        ("loraforge", "0.2.0", "loraforge version changed"),
        ("kind", "diff", "planned kind changed"),
        ("key", "blocks.1.q.weight", "key changed"),
    ],
)
def test_each_changed_field_names_its_reason(field, value, reason):
    stored = marker(fingerprint(**{field: value}))
    assert check(task(), stored, fingerprint()) == Decision(False, reason)


def test_several_changes_are_named_in_fingerprint_order():
    stored = marker(fingerprint(kernel={"method": "full"}, source=side(dtype="F32"), loraforge="0"))
    assert check(task(), stored, fingerprint()).reason == (
        "loraforge version changed, source tensor changed, kernel parameters changed"
    )


def test_marker_without_a_fingerprint_changed_everything():
    stored = {"kind": "lowrank", "rank": 16, "inputs": marker(fingerprint())["inputs"]}
    assert check(task(), stored, fingerprint()) == Decision(
        False,
        "loraforge version changed, key changed, planned kind changed, source tensor changed, "
        "target tensor changed, kernel parameters changed, "
        "device not recorded (older loraforge), this run uses cpu",
    )


def test_the_sketch_precision_counts_as_auto_resolves_it_on_the_device(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))

    def sketch(device="cpu", **options):
        return extract_fingerprint(task(), KernelOptions(**options), device)["kernel"].get("sketch")

    assert sketch() == sketch(sketch="bf16") == "bf16"
    assert sketch(sketch="fp32") == "fp32"
    assert sketch(method="full") is None  # an exact SVD has no sketch
    bf16_run = extract_fingerprint(task(), KernelOptions(), "cpu")
    fp32_now = extract_fingerprint(task(), KernelOptions(sketch="fp32"), "cpu")
    assert check(task(), marker(bf16_run), fp32_now) == Decision(False, "kernel parameters changed")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    assert sketch() == "fp32"  # the same auto, another CPU: fp32 results are reusable
    assert check(task(), marker(fp32_now), extract_fingerprint(task(), KernelOptions(), "cpu")) == (
        Decision(True)
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert sketch("cuda") == "fp32"


def test_lowrank_fingerprint_records_the_device_type_diffs_do_not(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    kernel = KernelOptions()
    for device in ("cpu", "cuda", "cuda:0", "cuda:3"):
        fp = extract_fingerprint(task(), kernel, device)
        assert fp["device"] == device.split(":")[0]
        assert "device" not in extract_fingerprint(task("diff"), kernel, device)
    assert extract_fingerprint(task(), kernel, "cuda:1") == extract_fingerprint(
        task(), kernel, "cuda"
    )


@pytest.mark.parametrize(
    "stored, now, reason",
    [
        ("cpu", "cuda", "computed on cpu, this run uses cuda"),
        ("cuda", "cpu", "computed on cuda, this run uses cpu"),
        (None, "cpu", "device not recorded (older loraforge), this run uses cpu"),
    ],
)
def test_lowrank_factors_from_another_device_are_recomputed(stored, now, reason):
    """The randomized kernel's test matrix comes from the device's generator: factors from a
    CPU and a GPU run must not be mixed in one output."""
    fp = fingerprint()
    if stored is None:
        del fp["device"]
    else:
        fp["device"] = stored
    assert check(task(), marker(fp), fingerprint(device=now)) == Decision(False, reason)
    # Named with any other change, in fingerprint order; a larger stored rank is not sliced.
    assert check(
        task(rank=8), marker({**fp, "loraforge": "0"}), fingerprint(device=now)
    ) == Decision(False, f"loraforge version changed, {reason}")


def test_results_exact_on_any_device_are_reused_across_devices():
    """A diff is exact fp32 subtraction (no device in its fingerprint); a planned low-rank
    tensor found unchanged was an exact test too: both are reused on another device."""
    kernel = KernelOptions()
    gpu_diff = extract_fingerprint(task("diff"), kernel, "cuda")
    cpu_diff = extract_fingerprint(task("diff"), kernel, "cpu")
    assert check(task("diff"), marker(gpu_diff, "diff"), cpu_diff) == Decision(True)
    stored = marker(fingerprint(device="cuda"), "unchanged")
    assert check(task(), stored, fingerprint(device="cpu")) == Decision(True)
    # The same device type is reused, whichever GPU index computed it.
    assert check(task(), marker(fingerprint(device="cuda")), fingerprint(device="cuda")) == (
        Decision(True)
    )


def test_a_marker_from_before_the_crc_is_recomputed():
    """Markers written before stats and CRCs were recorded (they hashed sampled windows)."""
    fp = fingerprint()
    old = {**fp, "source": {**side(), "size": 1000, "sample_sha256": "aa"}}
    stored = {"kind": "lowrank", "rank": 16, "fingerprint": old}
    assert check(task(), stored, fp) == Decision(False, "written by an older loraforge")


def test_fields_only_the_old_fingerprint_has_are_ignored():
    stored = marker(fingerprint("diff", kernel={"method": "full"}), "diff")
    assert check(task("diff"), stored, fingerprint("diff")) == Decision(True)


@pytest.mark.parametrize(
    "changed",
    [
        {"mtime_ns": 6},  # touched, or edited in place with the same size
        {"inode": 9},  # replaced by another file
        {"size": 1001},
    ],
)
def test_changed_stat_with_the_same_crc_is_reused_with_a_note(changed):
    crc = Crc()
    stats = {**STATS, "target": {**STATS["target"], **changed}}
    assert decide(task(), marker(fingerprint()), fingerprint(), stats, crc) == Decision(
        True,
        note="target file changed on disk, tensor bytes unchanged (CRC-32C)",
        rehashed=("target",),
    )
    assert crc.calls == ["target"]  # only the side whose file changed is re-hashed


def test_both_files_changed_with_the_same_crcs():
    crc = Crc()
    stats = {s: {**STATS[s], "mtime_ns": 99} for s in STATS}
    decision = decide(task(), marker(fingerprint()), fingerprint(), stats, crc)
    assert decision == Decision(
        True,
        note="source and target file changed on disk, tensor bytes unchanged (CRC-32C)",
        rehashed=("source", "target"),
    )
    assert crc.calls == ["source", "target"]


@pytest.mark.parametrize(
    "crcs, reason",
    [
        ({"source": 1}, "source tensor changed"),
        ({"target": 2}, "target tensor changed"),
        ({"source": 1, "target": 2}, "source tensor changed, target tensor changed"),
    ],
)
def test_changed_stat_and_crc_is_recomputed(crcs, reason):
    stats = {s: {**STATS[s], "mtime_ns": 99} for s in STATS}
    assert check(task(), marker(fingerprint()), fingerprint(), stats, Crc(**crcs)) == Decision(
        False, reason
    )


def test_a_sliced_rank_is_still_vouched_for_by_the_crc():
    stats = {**STATS, "source": stat(mtime_ns=99)}
    assert check(
        task(rank=16), marker(fingerprint(), rank=32), fingerprint(), stats, Crc(source=1)
    ) == Decision(False, "source tensor changed")
    assert check(
        task(rank=16), marker(fingerprint(), rank=32), fingerprint(), stats, Crc()
    ) == Decision(
        True,
        sliced_from=32,
        note="source file changed on disk, tensor bytes unchanged (CRC-32C)",
        rehashed=("source",),
    )


@pytest.mark.parametrize(
    "record, reason",
    [
        ({**STATS["source"]}, "no CRC-32C of the source tensor recorded"),
        ({}, "no CRC-32C of the source tensor recorded"),
        ({"changed_while_read": True}, "source file changed while it was read"),
    ],
)
def test_a_marker_without_a_crc_for_a_changed_file_is_recomputed(record, reason):
    inputs = {"source": record, "target": {**STATS["target"], "crc32c": CRCS["target"]}}
    stored = marker(fingerprint(), inputs=inputs)
    stats = {**STATS, "source": stat(mtime_ns=99)}
    assert check(task(), stored, fingerprint(), stats, Crc()) == Decision(False, reason)


def test_a_record_without_a_stat_never_matches_the_stat():
    target = {**STATS["target"], "crc32c": CRCS["target"]}
    stored = marker(
        fingerprint(), inputs={"source": {"changed_while_read": True}, "target": target}
    )
    assert check(task(), stored, fingerprint()) == Decision(
        False, "source file changed while it was read"
    )


def test_refreshed_marker_takes_the_rehashed_files_stats():
    stats = {**STATS, "target": stat(mtime_ns=99, inode=8)}
    stored = marker(fingerprint())
    decision = decide(task(), stored, fingerprint(), stats, Crc())
    refreshed = refreshed_marker(stored, decision, stats)
    assert refreshed["inputs"] == {
        "source": {**STATS["source"], "crc32c": CRCS["source"]},
        "target": {**stats["target"], "crc32c": CRCS["target"]},
    }
    assert stored["inputs"]["target"]["mtime_ns"] == 5  # the stored marker is not modified
    # With the refreshed marker the same stats are trusted again: nothing is read.
    assert check(task(), refreshed, fingerprint(), stats) == Decision(True)
    assert refreshed_marker(stored, Decision(True), stats) is None
    assert refreshed_marker(stored, Decision(False, "x"), stats) is None


def test_larger_stored_rank_is_sliced():
    stored = marker(fingerprint(), rank=32)
    assert check(task(rank=16), stored, fingerprint()) == Decision(True, None, 32)


def test_equal_stored_rank_is_reused_as_is():
    assert check(task(rank=16), marker(fingerprint(), rank=16), fingerprint()) == Decision(True)


def test_smaller_stored_rank_is_recomputed_without_reading():
    stats = {s: stat(mtime_ns=99) for s in STATS}  # the rank decides before any re-hash
    stored = marker(fingerprint(), rank=8)
    assert check(task(rank=16), stored, fingerprint(), stats) == Decision(
        False, "stored rank 8 < requested 16"
    )
    no_rank = {k: v for k, v in marker(fingerprint()).items() if k != "rank"}
    assert check(task(rank=16), no_rank, fingerprint()) == Decision(
        False, "stored rank 0 < requested 16"
    )


def test_a_changed_fingerprint_wins_over_a_usable_rank():
    stored = marker(fingerprint(target=side(dtype="F16")), rank=64)
    assert check(task(rank=16), stored, fingerprint()) == Decision(False, "target tensor changed")


def test_rank_is_not_checked_for_other_stored_kinds():
    fp = fingerprint()
    stored = marker(fp, kind="unchanged")
    assert check(task(rank=16), stored, fp) == Decision(True)


def test_stored_crc32c_is_the_crc_of_the_stored_bytes(tmp_path):
    path = tmp_path / "m.safetensors"
    tensors = {"w": torch.randn(33, 7).bfloat16(), "empty": torch.zeros(0, 4), "s": torch.ones(())}
    save_file(tensors, path)
    index = index_checkpoint(str(path))
    raw = path.read_bytes()
    for key, info in index.tensors.items():
        stored = raw[info.offset : info.offset + info.nbytes]
        assert stored_crc32c(info) == google_crc32c.value(stored), key
    assert stored_crc32c(index.tensors["empty"]) == google_crc32c.value(b"") == 0
    # A non-contiguous tensor is hashed in C order, like its stored bytes.
    w = tensors["w"]
    assert tensor_crc32c(w.t().contiguous().t()) == tensor_crc32c(w)


def test_the_task_records_stats_and_crcs_taken_before_the_read(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    save_file({KEY: torch.randn(64, 32, generator=g)}, tmp_path / "s.safetensors")
    save_file({KEY: torch.randn(64, 32, generator=g)}, tmp_path / "t.safetensors")
    source, target = (index_checkpoint(str(tmp_path / f"{n}.safetensors")) for n in "st")
    kernel = KernelOptions()
    plan = plan_extraction(source, target, ExtractOptions(kernel=kernel, lowrank_min_params=1))
    (t,) = plan.tasks
    work = tmp_path / "work"
    WorkDir(str(work)).create()
    marker = run_extract_task(t, str(work), "cpu", kernel, extract_fingerprint(t, kernel, "cpu"))
    for side, info in (("source", t.source), ("target", t.target)):
        assert marker["inputs"][side] == {**file_stat(info.file), "crc32c": stored_crc32c(info)}
    now = {s: file_stat(getattr(t, s).file) for s in ("source", "target")}
    assert decide(t, marker, extract_fingerprint(t, kernel, "cpu"), now, never) == Decision(True)

    # A file that changes while the task reads it is not vouched for.
    edited = {**now["target"], "mtime_ns": now["target"]["mtime_ns"] + 1}
    calls = iter([now["source"], now["target"], now["source"], edited])  # before, after
    monkeypatch.setattr(task_module, "file_stat", lambda path: next(calls))
    marker = run_extract_task(t, str(work), "cpu", kernel, extract_fingerprint(t, kernel, "cpu"))
    assert marker["inputs"] == {
        "source": {**now["source"], "crc32c": stored_crc32c(t.source)},
        "target": {"changed_while_read": True},
    }
    assert decide(t, marker, extract_fingerprint(t, kernel, "cpu"), now, never) == Decision(
        False, "target file changed while it was read"
    )


def test_a_gpu_task_hashes_its_staged_copies(tmp_path, monkeypatch):
    """On a GPU the task hashes the pinned copies the diff uses (staging faked by a clone)."""
    g = torch.Generator().manual_seed(1)
    save_file({KEY: torch.randn(8, 4, generator=g).bfloat16()}, tmp_path / "s.safetensors")
    save_file({KEY: torch.randn(8, 4, generator=g).bfloat16()}, tmp_path / "t.safetensors")
    source, target = (index_checkpoint(str(tmp_path / f"{n}.safetensors")) for n in "st")
    staged = []

    def stage(views, device, nbytes=None):
        staged.extend(view.clone() for view in views)
        return staged[-len(views) :]

    monkeypatch.setattr(task_module, "stage", stage)
    t = ExtractTask(KEY, "diff", (8, 4), 0, source.tensors[KEY], target.tensors[KEY], {})
    read = {}
    with task_module._read(t, torch.device("cuda"), read) as (base, tuned):
        assert base is staged[0] and tuned is staged[1]
    assert read == {
        "source": (file_stat(t.source.file), stored_crc32c(t.source)),
        "target": (file_stat(t.target.file), stored_crc32c(t.target)),
    }


def test_read_record():
    assert read_record(stat(), 5, stat()) == {**stat(), "crc32c": 5}
    assert read_record(stat(), 5, stat(mtime_ns=6)) == {"changed_while_read": True}


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


def test_a_device_change_is_noted_unless_the_previous_run_did_not_record_one():
    before, after = manifest(), manifest()
    after["device"] = "cuda"
    assert input_changes(before, after) == []  # run.json from before the device was recorded
    before["device"] = "cpu"
    assert input_changes(before, after) == [
        "device changed: cpu → cuda (low-rank tensors recomputed)"
    ]
    before["device"] = "cuda"
    assert input_changes(before, after) == []


def test_every_note_in_order():
    before = manifest(kernel={"rank": 4})
    changed = {"a.safetensors": {"size": 99, "header_sha256": "x"}}
    after = manifest(model("/s", changed), model("/t", changed), {"rank": 8})
    assert input_changes(before, after) == [
        "source model changed (a.safetensors)",
        "target model changed (a.safetensors)",
        "kernel parameters changed: {'rank': 4} → {'rank': 8}",
    ]
