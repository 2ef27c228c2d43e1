"""Crash safety and resume: SIGKILL in each phase, corruption, re-export, signals, locks."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.pipeline.io.reader import index_checkpoint
from tests.helpers import markers
from tests.helpers.checkpoints import MIN_PARAMS, pair_tensors
from tests.helpers.cli import CLI, run_cli, run_process
from tests.helpers.reference import read_report


@pytest.fixture
def many(tmp_path):
    """A pair with enough tensors that crash points fall in every phase."""
    base, tuned = pair_tensors()
    g = torch.Generator().manual_seed(7)
    for i in range(8):
        w = torch.randn(128, 96, generator=g) * 0.02
        base[f"extra.{i}.weight"] = w.bfloat16()
        tuned[f"extra.{i}.weight"] = (w + torch.randn(128, 96, generator=g) * 1e-3).bfloat16()
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")


def extract_args(pair, output, *extra):
    return [
        "extract",
        "--source-model",
        pair[0],
        "--target-model",
        pair[1],
        "--output",
        str(output),
        "--lowrank-min-params",
        str(MIN_PARAMS),
        "--rank",
        "8",
        "--quiet",
        *extra,
    ]


@pytest.mark.parametrize("point", ["compute:7", "write:8"])
def test_sigkill_then_resume_is_byte_identical(many, tmp_path, point):
    """SIGKILL the whole process group mid-phase (LORAFORGE_CRASH_AT, so the point does not
    race the clock): nothing that looks like an output is left, and the rerun gives the bytes
    of an uninterrupted run, reusing what was finished."""
    reference = tmp_path / "reference.safetensors"
    assert run_cli(*extract_args(many, reference)).exit_code == 0
    out = tmp_path / "crashed" / "lora.safetensors"
    crashed = run_process(*extract_args(many, out), env={"LORAFORGE_CRASH_AT": point})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert [n for n in os.listdir(out.parent) if n.endswith(".safetensors")] == []
    resumed = run_process(*extract_args(many, out))
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == reference.read_bytes()
    summary = read_report(str(out.with_suffix(".report.json")))["summary"]
    if point.startswith("write"):
        assert summary["computed"] == 0
    else:
        # At least the tensors finished before the kill are reused, not recomputed.
        assert summary["reused"] >= 7


def test_reexport_runs_no_kernel_and_matches_a_fresh_run(many, tmp_path):
    work = tmp_path / "work"
    assert (
        run_cli(*extract_args(many, tmp_path / "a.safetensors", "--work-dir", work)).exit_code == 0
    )
    again = run_cli(
        *extract_args(
            many,
            tmp_path / "b.safetensors",
            "--work-dir",
            work,
            "--output-dtype",
            "fp32",
            "--max-shard-size",
            "40KB",
        )
    )
    assert again.exit_code == 0, again.output
    summary = read_report(str(tmp_path / "b.report.json"))["summary"]
    assert summary["computed"] == 0 and summary["reused"] > 10
    assert (
        run_cli(
            *extract_args(
                many,
                tmp_path / "c.safetensors",
                "--output-dtype",
                "fp32",
                "--max-shard-size",
                "40KB",
            )
        ).exit_code
        == 0
    )
    names = sorted(n for n in os.listdir(tmp_path) if n.startswith(("b-", "c-")))
    assert len(names) >= 4
    for b_name in (n for n in names if n.startswith("b-")):
        c_name = "c-" + b_name[2:]
        assert (tmp_path / b_name).read_bytes() == (tmp_path / c_name).read_bytes()


def test_lower_rank_slices_stored_factors(many, tmp_path):
    work = tmp_path / "work"
    assert (
        run_cli(*extract_args(many, tmp_path / "a.safetensors", "--work-dir", work)).exit_code == 0
    )
    args = extract_args(many, tmp_path / "b.safetensors", "--work-dir", work)
    args[args.index("--rank") + 1] = "4"
    assert run_cli(*args).exit_code == 0
    report = read_report(str(tmp_path / "b.report.json"))
    entry = report["tensors"]["blocks.0.ffn.0.weight"]
    assert entry["status"] == "sliced" and "sliced from stored rank 8" in entry["note"]
    assert entry["rank"] == 4 and report["summary"]["computed"] == 0


def corrupt_chunk(work, key):
    folder = os.path.join(work, "tensors", key, "up")
    for name in sorted(os.listdir(folder)):
        if name.startswith("c."):
            path = os.path.join(folder, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            return
    raise AssertionError(f"no chunk in {folder}")


def statuses(path):
    return {
        k: e["status"] for k, e in read_report(path)["tensors"].items() if e["status"] != "planned"
    }


@pytest.mark.parametrize("damage", ["truncated chunk", "missing marker", "changed source"])
def test_damaged_entry_is_detected_and_only_it_recomputed(many, tmp_path, damage):
    work = str(tmp_path / "work")
    first = tmp_path / "a.safetensors"
    assert run_cli(*extract_args(many, first, "--work-dir", work)).exit_code == 0
    key = "extra.3.weight"
    if damage == "truncated chunk":
        corrupt_chunk(work, key)
    elif damage == "missing marker":
        markers.lose(work, key)
    else:  # rewrite the base file (a new inode) with one tensor changed; same header
        tensors = load_file(many[0])
        tensors[key] = tensors[key] + 0.5
        save_file(tensors, many[0])
    second = tmp_path / "b.safetensors"
    result = run_cli(*extract_args(many, second, "--work-dir", work))
    assert result.exit_code == 0, result.output
    status = statuses(str(tmp_path / "b.report.json"))
    changed = {k for k, s in status.items() if s != "reused"}
    assert changed == {key}, status
    if damage != "changed source":
        assert first.read_bytes() == second.read_bytes()


def notes(path):
    return {k: e.get("note", "") for k, e in read_report(path)["tensors"].items()}


def test_an_unreadable_intermediate_is_recomputed_where_the_tasks_run(many, tmp_path, monkeypatch):
    """The export's recompute goes through the session's task execution (the --gpus workers
    or the cluster, with their device), not a call in the client process."""
    from loraforge.pipeline.extract.task import run_extract_task
    from loraforge.pipeline.run.session import Session

    work = str(tmp_path / "work")
    first = tmp_path / "a.safetensors"
    assert run_cli(*extract_args(many, first, "--work-dir", work)).exit_code == 0
    key = "extra.3.weight"
    corrupt_chunk(work, key)
    calls = []
    compute = Session.compute

    def recorded(self, task_calls, progress=True):
        calls.append([(c.key, c.fn, c.args[2], c.uses_gpu) for c in task_calls])
        return compute(self, task_calls, progress)

    monkeypatch.setattr(Session, "compute", recorded)
    second = tmp_path / "b.safetensors"
    result = run_cli(*extract_args(many, second, "--work-dir", work, "--device", "cpu"))
    assert result.exit_code == 0, result.output
    # Nothing pending after the resume check; then the one recompute, during the write.
    assert calls == [[], [(f"lowrank-{key}", run_extract_task, "cpu", False)]]
    status = statuses(str(tmp_path / "b.report.json"))
    assert {k for k, s in status.items() if s != "reused"} == {key}
    assert status[key] == "recomputed"
    assert "intermediate was unreadable" in notes(str(tmp_path / "b.report.json"))[key]
    assert first.read_bytes() == second.read_bytes()


def test_lowrank_factors_from_another_device_are_recomputed_diffs_reused(many, tmp_path):
    """Markers as a GPU run would leave them (device type cuda in a low-rank fingerprint): a
    CPU resume recomputes the low-rank tensors, says why, and reuses the exact diffs."""
    work = tmp_path / "work"
    first = tmp_path / "a.safetensors"
    assert run_cli(*extract_args(many, first, "--work-dir", work)).exit_code == 0
    assert json.loads((work / "run.json").read_text())["device"] == "cpu"
    lowrank = set()
    finished = markers.stored(work)
    for key, marker in finished.items():
        if "device" in marker["fingerprint"]:
            assert marker["fingerprint"]["device"] == "cpu"
            marker["fingerprint"]["device"] = "cuda"
            markers.replace(work, key, marker)
            lowrank.add(key)
        else:
            assert marker["fingerprint"]["kind"] == "diff"
    assert lowrank and len(lowrank) < len(finished)
    second = tmp_path / "b.safetensors"
    result = run_cli(*extract_args(many, second, "--work-dir", work))
    assert result.exit_code == 0, result.output
    status, note = statuses(str(tmp_path / "b.report.json")), notes(str(tmp_path / "b.report.json"))
    unchanged = {k for k in lowrank if status[k] == "reused"}  # found unchanged: exact too
    assert {k for k, s in status.items() if s != "reused"} == lowrank - unchanged
    for key in lowrank - unchanged:
        assert status[key] == "computed"
        assert "recomputed: computed on cuda, this run uses cpu" in note[key]
    assert first.read_bytes() == second.read_bytes()


def test_in_place_edit_of_one_tensor_recomputes_exactly_it(many, tmp_path):
    """Bytes of one tensor overwritten at its offset, the file's size unchanged: the stat
    changed, so every tensor of the file is re-hashed; only the edited one is recomputed."""
    work = str(tmp_path / "work")
    assert (
        run_cli(*extract_args(many, tmp_path / "a.safetensors", "--work-dir", work)).exit_code == 0
    )
    key = "blocks.0.ffn.0.weight"
    info = index_checkpoint(many[1]).tensors[key]
    edited = (load_file(many[1])[key].float() * 1.5).to(torch.bfloat16)
    size = os.path.getsize(many[1])
    fd = os.open(many[1], os.O_WRONLY)
    try:
        assert os.pwrite(fd, edited.view(torch.uint8).numpy().tobytes(), info.offset) == info.nbytes
    finally:
        os.close(fd)
    assert os.path.getsize(many[1]) == size
    second = tmp_path / "b.safetensors"
    result = run_cli(*extract_args(many, second, "--work-dir", work))
    assert result.exit_code == 0, result.output
    status = statuses(str(tmp_path / "b.report.json"))
    assert {k for k, s in status.items() if s != "reused"} == {key}, status
    assert status[key] == "computed"
    assert "recomputed: target tensor changed" in notes(str(tmp_path / "b.report.json"))[key]
    fresh = tmp_path / "fresh.safetensors"
    assert run_cli(*extract_args(many, fresh)).exit_code == 0
    assert second.read_bytes() == fresh.read_bytes()
    assert second.read_bytes() != (tmp_path / "a.safetensors").read_bytes()


def test_touched_inputs_are_rehashed_once_and_nothing_recomputed(many, tmp_path):
    work = str(tmp_path / "work")
    first = tmp_path / "a.safetensors"
    assert run_cli(*extract_args(many, first, "--work-dir", work)).exit_code == 0
    for path in many:
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = tmp_path / "b.safetensors"
    assert run_cli(*extract_args(many, again, "--work-dir", work)).exit_code == 0
    report = str(tmp_path / "b.report.json")
    assert set(statuses(report).values()) == {"reused"}
    note = "source and target file changed on disk, tensor bytes unchanged (CRC-32C)"
    assert all(note in n for k, n in notes(report).items() if k in statuses(report))
    assert again.read_bytes() == first.read_bytes()
    # The markers now hold the new stats: the next resume reads no tensor.
    assert run_cli(*extract_args(many, again, "--work-dir", work)).exit_code == 0
    assert set(statuses(report).values()) == {"reused"}
    assert not any("CRC-32C" in n for n in notes(report).values())


def test_changed_kernel_parameters_recompute_lowrank_entries_only(many, tmp_path):
    work = str(tmp_path / "work")
    assert (
        run_cli(*extract_args(many, tmp_path / "a.safetensors", "--work-dir", work)).exit_code == 0
    )
    result = run_cli(
        *extract_args(many, tmp_path / "b.safetensors", "--work-dir", work, "--oversample", "8")
    )
    assert result.exit_code == 0
    report = read_report(str(tmp_path / "b.report.json"))
    for key, entry in report["tensors"].items():
        if entry["kind"] == "lowrank":
            assert entry["status"] == "computed"
            assert "kernel parameters changed" in entry["note"]
        elif entry["status"] != "planned":
            assert entry["status"] == "reused", key


def test_no_resume_starts_over(many, tmp_path):
    work = str(tmp_path / "work")
    assert (
        run_cli(*extract_args(many, tmp_path / "a.safetensors", "--work-dir", work)).exit_code == 0
    )
    assert (
        run_cli(
            *extract_args(many, tmp_path / "a.safetensors", "--work-dir", work, "--no-resume")
        ).exit_code
        == 0
    )
    assert read_report(str(tmp_path / "a.report.json"))["summary"]["reused"] == 0


def test_keep_work_and_clean(many, tmp_path):
    out = tmp_path / "a.safetensors"
    assert run_cli(*extract_args(many, out, "--no-keep-work")).exit_code == 0
    assert not (tmp_path / "a.safetensors.work").exists()
    assert run_cli(*extract_args(many, out)).exit_code == 0
    assert (tmp_path / "a.safetensors.work" / "done").is_dir()
    result = run_cli("clean", str(tmp_path / "a.safetensors.work"))
    assert result.exit_code == 0 and "removed" in result.output
    assert not (tmp_path / "a.safetensors.work").exists()
    assert run_cli("clean", str(tmp_path)).exit_code == 2


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(many, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / "lock.json").write_text(
            json.dumps({"pid": sleeper.pid, "host": os.uname().nodename})
        )
        result = run_cli(*extract_args(many, tmp_path / "a.safetensors", "--work-dir", work))
        assert result.exit_code == 3 and f"pid {sleeper.pid}" in result.output
    finally:
        sleeper.kill()
        sleeper.wait()
    result = run_cli(*extract_args(many, tmp_path / "a.safetensors", "--work-dir", work))
    assert result.exit_code == 0, result.output
    assert not (work / "lock.json").exists()


@pytest.fixture
def slow(tmp_path):
    """Twelve 768×768 deltas: with --svd full and one worker, a few seconds of work."""
    g = torch.Generator().manual_seed(3)
    base, tuned = {}, {}
    for i in range(12):
        w = torch.randn(768, 768, generator=g) * 0.02
        base[f"layer.{i}.weight"] = w
        tuned[f"layer.{i}.weight"] = w + torch.randn(768, 768, generator=g) * 1e-3
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_and_the_rerun_resumes(slow, tmp_path, sig):
    out = tmp_path / "lora.safetensors"
    proc = subprocess.Popen(
        CLI + extract_args(slow, out, "--svd", "full", "--workers", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    work = tmp_path / "lora.safetensors.work"
    deadline = time.time() + 60
    while time.time() < deadline and not ((work / "done").is_dir() and markers.count(work) >= 2):
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert not out.exists()
    finished = markers.count(work)
    assert finished >= 2
    resumed = run_process(*extract_args(slow, out, "--svd", "full"))
    assert resumed.returncode == 0
    assert read_report(str(out.with_suffix(".report.json")))["summary"]["reused"] >= finished
