"""Extraction fits in less memory than its two checkpoints (cgroup v1 limit; skipped where the
kernel refuses)."""

import os
import signal
import subprocess
import sys
import uuid

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.helpers.cli import run_process
from tests.helpers.reference import read_report

CGROUP_ROOT = "/sys/fs/cgroup/memory"
LIMIT = 700 * 2**20


def _make_cgroup(limit: int):
    path = os.path.join(CGROUP_ROOT, f"loraforge-test-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
        for name in ("memory.memsw.limit_in_bytes",):  # no swapping our way out of the limit
            if os.path.exists(os.path.join(path, name)):
                with open(os.path.join(path, name), "w") as f:
                    f.write(str(limit))
    except OSError as e:
        pytest.skip(f"cannot create a memory cgroup here ({e.strerror})")
    return path


def _remove_cgroup(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


def _entering(cgroup: str):
    """A ``preexec_fn`` that moves the child into ``cgroup``."""

    def enter():
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    return enter


@pytest.fixture
def cgroup():
    path = _make_cgroup(LIMIT)
    yield path
    _remove_cgroup(path)


def test_extract_runs_in_less_memory_than_its_checkpoints(tmp_path, cgroup):
    g = torch.Generator().manual_seed(0)
    for name, offset in (("base", 0.0), ("tuned", 1.0)):
        tensors = {}
        for i in range(12):
            w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(i)) * 0.02
            if offset:
                w += torch.randn(4096, 8, generator=g) @ torch.randn(8, 4096, generator=g) * 1e-3
            tensors[f"layer.{i}.weight"] = w.bfloat16()
        save_file(tensors, tmp_path / f"{name}.safetensors")
        del tensors
    checkpoints = sum(os.path.getsize(tmp_path / f"{n}.safetensors") for n in ("base", "tuned"))
    assert checkpoints > LIMIT
    procs = os.path.join(cgroup, "cgroup.procs")

    def enter_cgroup():
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    done = run_process(
        "extract",
        "--quiet",
        "--source-model",
        tmp_path / "base.safetensors",
        "--target-model",
        tmp_path / "tuned.safetensors",
        "--output",
        tmp_path / "lora.safetensors",
        "--rank",
        "8",
        "--workers",
        "2",
        preexec_fn=enter_cgroup,
        timeout=300,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", ""), done.stderr[-2000:]
    with safe_open(tmp_path / "lora.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(
            f"diffusion_model.layer.{i}.{name}"
            for i in range(12)
            for name in ("lora_up.weight", "lora_down.weight")  # alpha = rank: no key
        )
        assert f.get_slice("diffusion_model.layer.0.lora_up.weight").get_shape() == [4096, 8]
    report = read_report(tmp_path / "lora.report.json")
    assert report["summary"]["kinds"] == {"lowrank": 12}
    # Control: loading both checkpoints in fp32, as peer tools do, is killed under the limit.
    naive = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from safetensors.torch import load_file; "
            "a, b = ({k: v.float() for k, v in load_file(p).items()} for p in sys.argv[1:])",
            str(tmp_path / "base.safetensors"),
            str(tmp_path / "tuned.safetensors"),
        ],
        preexec_fn=enter_cgroup,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert naive.returncode == -signal.SIGKILL, (naive.returncode, naive.stderr[-2000:])


BLOCKED_LIMIT = 768 * 2**20
EMBED = (100_000, 2048)  # fp32: 819 MB, more than the whole limit


@pytest.fixture
def small_cgroup():
    path = _make_cgroup(BLOCKED_LIMIT)
    yield path
    _remove_cgroup(path)


def test_tensor_larger_than_the_limit_is_extracted_and_merged_blocked(tmp_path, small_cgroup):
    g = torch.Generator().manual_seed(3)
    rows, cols = EMBED
    assert 4 * rows * cols > BLOCKED_LIMIT
    base = {
        "embed.weight": (torch.randn(rows, cols, generator=g) * 0.02).bfloat16(),
        "layer.weight": (torch.randn(512, 512, generator=g) * 0.02).bfloat16(),
        "layer.bias": torch.zeros(512).bfloat16(),
    }
    up, down = torch.randn(rows, 4, generator=g), torch.randn(4, cols, generator=g) * 0.05
    tuned = {
        "embed.weight": base["embed.weight"] + (up @ down).bfloat16(),
        "layer.weight": base["layer.weight"] + 0.01,
        "layer.bias": base["layer.bias"] + 0.5,
    }
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    del up, down
    enter = _entering(small_cgroup)
    done = run_process(
        *("extract", "--quiet", "--rank", "4", "--output-dtype", "fp32", "--workers", "2"),
        *("--source-model", tmp_path / "base.safetensors"),
        *("--target-model", tmp_path / "tuned.safetensors"),
        *("--output", tmp_path / "lora.safetensors", "--lowrank-min-params", "100000"),
        preexec_fn=enter,
        timeout=600,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr[-2000:]
    report = read_report(tmp_path / "lora.report.json")
    assert report["summary"]["memory"]["blocked"] == ["embed.weight"]
    assert report["summary"]["memory"]["budget_bytes"] < BLOCKED_LIMIT
    assert report["tensors"]["embed.weight"]["note"].startswith("ran blocked: ")
    # rank 4 holds the whole delta: what is left is the bf16 rounding of the tuned weights
    assert report["tensors"]["embed.weight"]["kernel_rel_error"] < 0.005

    done = run_process(
        *("merge", "--quiet", "--source-model", tmp_path / "base.safetensors"),
        *("--lora-model", tmp_path / "lora.safetensors"),
        *("--output", tmp_path / "merged.safetensors", "--output-dtype", "bf16"),
        preexec_fn=enter,
        timeout=600,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stderr[-2000:]
    merged = read_report(tmp_path / "merged.report.json")
    assert merged["summary"]["memory"]["blocked"] == ["embed.weight"]
    with safe_open(tmp_path / "merged.safetensors", "pt") as f:
        for key in ("embed.weight", "layer.weight", "layer.bias"):
            got, want = f.get_tensor(key).float(), tuned[key].float()
            # bf16 rounding of the merge (one ulp: 2^-8 relative) is all that differs
            assert float((got - want).abs().max()) <= float(want.abs().max()) * 2**-7, key
