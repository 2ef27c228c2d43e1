"""Interrupted merges resume from their markers and give the bytes of an uninterrupted run."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.pipeline.io.atomic import temporary_name
from loraforge.pipeline.io.layout import OutputEntry
from loraforge.pipeline.io.slots import write_at
from loraforge.pipeline.io.writer import SafetensorsOutput
from loraforge.pipeline.lora.config import LoraSpec, MergeConfig
from loraforge.pipeline.merge import command as merge_command
from loraforge.pipeline.merge.command import merge
from loraforge.pipeline.merge.options import MergeOptions
from loraforge.pipeline.merge.task import run_merge_task
from loraforge.pipeline.run.options import RunOptions
from tests.helpers import markers
from tests.helpers.checkpoints import Q, lora_pair, make_base, rand, save_lora
from tests.helpers.cli import run_process


def run(base, loras, output, *, options, strengths=None, workers=2, resume=True) -> dict:
    """The merge through the Python API on the CPU; returns the report."""
    strengths = strengths or [1.0] * len(loras)
    config = MergeConfig(tuple(LoraSpec(str(p), s) for p, s in zip(loras, strengths, strict=True)))
    return merge(
        source_model=str(base),
        loras=config,
        output=str(output),
        options=options,
        run=RunOptions(device="cpu", workers=workers, resume=resume),
    )


class Boom(RuntimeError):
    pass


def failing_on(keys: set[str]):
    """``run_merge_task`` that dies on ``keys`` (after the others it ran wrote their markers)."""

    def task(merge_task, *args, **kwargs):
        if merge_task.key in keys:
            raise Boom(merge_task.key)
        return run_merge_task(merge_task, *args, **kwargs)

    return task


def inputs(tmp_path, dtype=torch.bfloat16):
    base, _ = make_base(tmp_path, dtype=dtype)
    lora = {
        **lora_pair(Q, ".lora_up.weight", ".lora_down.weight"),
        **lora_pair("blocks.0.ffn.0", ".lora_up.weight", ".lora_down.weight", out=64),
        "blocks.0.attn.q.diff_b": rand(48, seed=3),
    }
    return base, save_lora(tmp_path, "lora.safetensors", lora)


def reference(tmp_path, base, lora, name, options, **kwargs) -> bytes:
    directory = tmp_path / "reference"
    directory.mkdir(exist_ok=True)
    run(base, [lora], directory / name, options=options, **kwargs)
    single = directory / name
    return single.read_bytes() if single.exists() else b""  # shards are compared one by one


@pytest.mark.parametrize(
    "options, name",
    [
        (MergeOptions(), "m.safetensors"),
        (MergeOptions(max_shard_size=2000), "m.safetensors"),
        (MergeOptions(output_format="pytorch"), "m.pt"),
    ],
    ids=["single", "shards", "pytorch"],
)
def test_failed_task_resumes_byte_identically(tmp_path, monkeypatch, options, name):
    base, lora = inputs(tmp_path)
    out = tmp_path / "out" / name
    with monkeypatch.context() as patch:
        patch.setattr(merge_command, "run_merge_task", failing_on({"patch_embedding.weight"}))
        with pytest.raises(Boom):
            run(base, [lora], out, options=options, workers=1)
    assert not any(p.name == name or p.name.endswith(".json") for p in out.parent.iterdir())
    done = markers.count(str(out) + ".work")
    assert 0 < done < 8
    report = run(base, [lora], out, options=options, workers=1)
    summary = report["summary"]
    assert summary["reused"] == done and summary["computed"] == 8 - done
    assert not os.path.exists(str(out) + ".work")
    files = [os.path.basename(f) for f in summary["files"]]
    expected = reference(tmp_path, base, lora, name, options, workers=1)
    if options.max_shard_size:
        assert len(files) > 2
        for file in files:
            assert (out.parent / file).read_bytes() == (tmp_path / "reference" / file).read_bytes()
    else:
        assert out.read_bytes() == expected


def test_changed_inputs_start_the_output_afresh(tmp_path, monkeypatch):
    base, lora = inputs(tmp_path)
    out = tmp_path / "m.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(merge_command, "run_merge_task", failing_on({"patch_embedding.weight"}))
        with pytest.raises(Boom):
            run(base, [lora], out, options=MergeOptions(), workers=1)
    report = run(base, [lora], out, strengths=[0.5], options=MergeOptions(), workers=1)
    assert report["summary"]["reused"] == 0 and report["summary"]["computed"] == 8
    assert report["summary"]["input_changes"] == [
        f"the LoRAs or their strengths, the merge plan changed since the run that left {out}.work"
    ]
    expected = reference(tmp_path, base, lora, out.name, MergeOptions(), strengths=[0.5])
    assert out.read_bytes() == expected


def test_no_resume_recomputes_everything(tmp_path, monkeypatch):
    base, lora = inputs(tmp_path)
    out = tmp_path / "m.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(merge_command, "run_merge_task", failing_on({"patch_embedding.weight"}))
        with pytest.raises(Boom):
            run(base, [lora], out, options=MergeOptions(), workers=1)
    report = run(base, [lora], out, options=MergeOptions(), resume=False)
    assert report["summary"]["reused"] == 0 and report["summary"]["input_changes"] == []


def test_a_temporary_with_another_header_is_laid_out_again(tmp_path, monkeypatch):
    base, lora = inputs(tmp_path)
    out = tmp_path / "m.safetensors"
    with monkeypatch.context() as patch:
        patch.setattr(merge_command, "run_merge_task", failing_on({"patch_embedding.weight"}))
        with pytest.raises(Boom):
            run(base, [lora], out, options=MergeOptions(), workers=1)
    with open(temporary_name(str(out)), "r+b") as f:
        f.seek(20)
        f.write(b"X")  # the header no longer matches the plan: no marker can be trusted
    report = run(base, [lora], out, options=MergeOptions())
    assert report["summary"]["reused"] == 0
    assert out.read_bytes() == reference(tmp_path, base, lora, out.name, MergeOptions())


def test_writer_reuses_only_a_matching_temporary(tmp_path):
    entries = [OutputEntry("a", "F32", (2, 3)), OutputEntry("b", "I64", (4,))]
    out = str(tmp_path / "x.safetensors")
    first = SafetensorsOutput(out, entries)
    write_at(first.slot("a"), torch.ones(2, 3))
    first.close()
    again = SafetensorsOutput(out, entries, reuse=True)
    assert again.reused == {out}
    again.mark_written("a")
    slot_a = again.slot("a")
    write_at(again.slot("b"), torch.arange(4))
    again.mark_written("b")
    again.commit()
    assert torch.equal(load_file(out)["a"], torch.ones(2, 3))
    other = SafetensorsOutput(out, [OutputEntry("a", "F32", (3, 2))], reuse=True)
    assert other.reused == set()
    other.abort()
    with pytest.raises(ValueError, match="planned F32"):
        write_at(slot_a, torch.ones(3, 2))


def many_patched_tensors(tmp_path, count: int, size: int, rank: int, lora_seed: int):
    """``count`` square bf16 weights, a LoRA patching each, and the merge command line."""
    tensors = {f"blocks.{i}.proj.weight": rand(size, size, seed=i).bfloat16() for i in range(count)}
    base = str(tmp_path / "base.safetensors")
    save_file(tensors, base)
    lora = {
        f"blocks.{i}.proj.{role}": rand(*shape, seed=lora_seed + i)
        for i in range(count)
        for role, shape in (("lora_up.weight", (size, rank)), ("lora_down.weight", (rank, size)))
    }
    lora_path = save_lora(tmp_path, "lora.safetensors", lora)
    out = tmp_path / "run" / "merged.safetensors"
    args = ["merge", "--source-model", base]
    args += ["--lora-model", lora_path, "--output", str(out), "--workers", "1", "--quiet"]
    return base, lora_path, out, args


def crash_at(args: list[str], point: str):
    """Run ``args`` until LORAFORGE_CRASH_AT SIGKILLs its process group at ``point``."""
    crashed = run_process(*args, env={"LORAFORGE_CRASH_AT": point}, timeout=120)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path):
    """A real process whose whole group is SIGKILLed once half the tensors are done
    (LORAFORGE_CRASH_AT, so the point does not race the clock), then resumed. A merge has one
    phase that computes (tasks write their bytes in place), so one crash point covers it."""
    point = 150
    base, lora_path, out, args = many_patched_tensors(tmp_path, 300, 64, 4, lora_seed=1000)
    args += ["--device", "cpu", "--strength", "0.7"]
    crash_at(args, f"compute:{point}")
    work = out.parent / "merged.safetensors.work"
    finished = markers.count(work)
    # Workers may finish more than the client counted before the kill, even all of them.
    assert point <= finished <= 300 and not out.exists()
    lock = json.loads((work / "lock.json").read_text())
    assert isinstance(lock["pid"], int)  # left behind by the dead run, taken over below

    resumed = run_process(*args, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out.parent / "merged.report.json").read_text())
    assert report["summary"]["reused"] >= finished
    assert report["summary"]["computed"] == 300 - report["summary"]["reused"]
    expected = reference(
        tmp_path, base, lora_path, out.name, MergeOptions(), strengths=[0.7], workers=1
    )
    assert out.read_bytes() == expected


def test_resume_rewrites_a_finished_tensor_whose_bytes_are_gone(tmp_path):
    """A marker counts only if the bytes at its offset still have its CRC (a machine that went
    down before the page cache reached the disk loses bytes, not markers)."""
    base, lora_path, out, args = many_patched_tensors(tmp_path, 40, 32, 2, lora_seed=500)
    crash_at(args, "compute:20")
    # Dask picks the order, so take a tensor that certainly finished: one with a marker.
    finished = markers.stored(out.parent / "merged.safetensors.work")
    assert len(finished) >= 20
    marker = finished[sorted(finished)[0]]
    key = marker["key"]
    with open(out.parent / marker["file"], "r+b") as f:  # the temporary output
        f.seek(marker["offset"])
        f.write(b"\0" * marker["nbytes"])
    resumed = run_process(*args, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads((out.parent / "merged.report.json").read_text())
    reused = {k for k, e in report["tensors"].items() if e["status"] == "reused"}
    # Every other finished tensor is reused; the zeroed one alone is computed again.
    assert reused == set(finished) - {key}
    assert report["tensors"][key]["status"] == "computed"
    assert report["summary"]["computed"] == 40 - len(reused)
    expected = reference(tmp_path, base, lora_path, out.name, MergeOptions(), workers=1)
    assert out.read_bytes() == expected
