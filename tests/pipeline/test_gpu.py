"""GPUs: choosing them, one pinned worker process per GPU, the per-device lock; and, on a
machine with CUDA (tests marked gpu), extract and merge on cuda and ``--gpus`` runs that give
the bytes of a one-GPU run."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from loraforge.pipeline import gpu
from loraforge.pipeline.cluster import GPU, dashboard_link, task_resources
from loraforge.pipeline.errors import UsageError
from tests.conftest import MIN_PARAMS
from tests.helpers import apply_reference, read_report, run_cli

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


# ---- choosing GPUs (pure) ----
def test_select_gpus_maps_torch_indices_to_visible_devices():
    assert gpu.select_gpus("all", ["0", "1", "2"]) == ["0", "1", "2"]
    assert gpu.select_gpus("ALL", ["3"]) == ["3"]
    assert gpu.select_gpus("0,2", ["4", "5", "6"]) == ["4", "6"]
    assert gpu.select_gpus(" 1 ", ["GPU-a", "GPU-b"]) == ["GPU-b"]


@pytest.mark.parametrize(
    "spec, visible, message",
    [
        ("all", [], "no CUDA device is visible"),
        ("0", [], "no CUDA device is visible"),
        ("2", ["0", "1"], "no GPU 2; 2 visible (0-1)"),
        ("-1", ["0", "1"], "no GPU -1"),
        ("0,0", ["0", "1"], "listed twice"),
        ("first", ["0"], "cannot read --gpus 'first'"),
        ("", ["0"], "cannot read --gpus ''"),
    ],
)
def test_select_gpus_refuses_with_one_line(spec, visible, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        gpu.select_gpus(spec, visible)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu.visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    assert gpu.visible_gpus() == ["3", "7"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.visible_gpus() == []


def test_gpu_worker_specs_pin_one_process_per_gpu():
    specs = gpu.gpu_worker_specs(["0", "3"])
    assert list(specs) == ["gpu-0", "gpu-3"]
    for device, spec in zip(["0", "3"], specs.values(), strict=True):
        assert spec["cls"] == "distributed.Nanny"  # a process per worker
        options = spec["options"]
        assert options["env"] == {"CUDA_VISIBLE_DEVICES": device}
        assert options["resources"] == {GPU: 1}
        assert options["nthreads"] == gpu.GPU_THREADS == 2
        assert options["memory_limit"] == 0
    assert gpu.gpu_worker_specs(["1"], threads=3)["gpu-1"]["options"]["nthreads"] == 3
    # two GPU tasks fit one GPU worker's resource: one reads while the other computes
    assert 1 / task_resources(True)[GPU] == gpu.GPU_THREADS


def _pinned_device() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.slow
def test_gpu_cluster_starts_pinned_worker_processes(monkeypatch):
    """The fallback without dask-cuda, started for real (no GPU needed to start it)."""
    from distributed import Client

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails: the SpecCluster path
    with gpu.gpu_cluster(["0", "1"]) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        pinned = client.run(_pinned_device)
        assert sorted(pinned.values()) == ["0", "1"]
        assert all(pid != os.getpid() for pid in client.run(os.getpid).values())
        workers = client.scheduler_info()["workers"].values()
        assert [w["resources"] for w in workers] == [{GPU: 1}, {GPU: 1}]
        assert [w["nthreads"] for w in workers] == [2, 2]
        assert dashboard_link(client)  # a distributed cluster: its dashboard is shown
        future = client.submit(_pinned_device, resources=task_resources(True), pure=False)
        assert future.result(timeout=60) in ("0", "1")


def test_device_lock_is_per_device_and_absent_on_cpu():
    cpu = torch.device("cpu")
    with gpu.device_lock(cpu):
        with gpu.device_lock(cpu):  # no lock: CPU tasks run side by side
            pass
    first = gpu.device_lock(torch.device("cuda"))
    assert first is gpu.device_lock(torch.device("cuda:0"))
    assert first is not gpu.device_lock(torch.device("cuda:1"))
    view = torch.arange(6.0).view(2, 3)
    assert gpu.stage(view, "source", cpu) is view  # nothing to overlap on the CPU


# ---- the CLI without CUDA ----
def _extract_args(pair, tmp_path):
    return [
        "extract",
        "--source-model",
        pair[0],
        "--target-model",
        pair[1],
        "--output",
        tmp_path / "lora.safetensors",
    ]


@no_cuda
def test_gpus_without_cuda_is_one_usage_line(pair, tmp_path):
    for args in (
        _extract_args(pair, tmp_path),
        ["merge", "--source-model", pair[0], "--lora-model", pair[1]]
        + ["--output", tmp_path / "merged.safetensors"],
    ):
        result = run_cli(*args, "--gpus", "all")
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [
            "error: --gpus all: no CUDA device is visible (drop --gpus, or use --device cpu)"
        ]
        assert not os.path.exists(tmp_path / "lora.safetensors")


def test_gpus_contradicting_device_or_scheduler_is_one_usage_line(pair, tmp_path):
    args = _extract_args(pair, tmp_path)
    result = run_cli(*args, "--gpus", "0", "--device", "cpu")
    assert result.exit_code == 2 and "--device cpu contradicts it" in result.stderr
    result = run_cli(*args, "--gpus", "all", "--scheduler", "tcp://127.0.0.1:1")
    assert result.exit_code == 2 and "cannot be combined with --scheduler" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_help_shows_gpus_and_json():
    for command in ("extract", "merge"):
        result = run_cli(command, "--help")
        assert result.exit_code == 0
        assert "--gpus" in result.output and "--json" in result.output


# ---- on CUDA ----
def _extract(pair, output, *extra) -> dict:
    result = run_cli(
        *_extract_args(pair, output.parent)[:-1],
        output,
        "--lowrank-min-params",
        MIN_PARAMS,
        "--rank",
        8,
        "--quiet",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return read_report(str(output.with_suffix(".report.json")))


def _merge(base, lora, output, *extra):
    result = run_cli(
        "merge",
        "--source-model",
        base,
        "--lora-model",
        lora,
        "--strength",
        "0.7",
        "--output",
        output,
        "--output-dtype",
        "fp32",
        "--quiet",
        *extra,
    )
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.gpu
def test_extract_on_cuda_reproduces_the_target_and_repeats_bytes(pair, tmp_path):
    first = tmp_path / "a" / "lora.safetensors"
    report = _extract(pair, first, "--device", "cuda", "--output-dtype", "fp32")
    assert report["summary"]["device"] == "cuda"
    base, tuned = load_file(pair[0]), load_file(pair[1])
    merged = apply_reference(base, load_file(first))
    for key, entry in report["tensors"].items():
        if entry["kind"] in ("lowrank", "diff"):
            error = float((merged[key] - tuned[key].float()).norm())
            delta = float((tuned[key].float() - base[key].float()).norm())
            assert error <= entry["rel_error"] * delta * 1.05 + 1e-6, key
    second = tmp_path / "b" / "lora.safetensors"
    _extract(pair, second, "--device", "cuda", "--output-dtype", "fp32", "--workers", "3")
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.gpu
def test_merge_on_cuda_matches_cpu_within_fp32_rounding(pair, tmp_path):
    lora = tmp_path / "lora.safetensors"
    _extract(pair, lora, "--device", "cpu")
    on_cpu, on_gpu = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    _merge(pair[0], lora, on_cpu, "--device", "cpu")
    _merge(pair[0], lora, on_gpu, "--device", "cuda")
    cpu, cuda = load_file(on_cpu), load_file(on_gpu)
    assert cpu.keys() == cuda.keys()
    for key in cpu:
        torch.testing.assert_close(cuda[key], cpu[key], rtol=1e-5, atol=1e-6)
    again = tmp_path / "gpu2.safetensors"
    _merge(pair[0], lora, again, "--device", "cuda", "--workers", "3")
    assert again.read_bytes() == on_gpu.read_bytes()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpus_all_gives_the_bytes_of_one_gpu(pair, tmp_path):
    one = tmp_path / "one" / "lora.safetensors"
    _extract(pair, one, "--device", "cuda", "--workers", "1")
    every = tmp_path / "all" / "lora.safetensors"
    result = run_cli(
        *_extract_args(pair, every.parent)[:-1],
        every,
        "--lowrank-min-params",
        MIN_PARAMS,
        "--rank",
        8,
        "--gpus",
        "all",
        "--json",
    )
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.stdout.splitlines()]
    (cluster,) = [e for e in events if e["event"] == "cluster"]
    assert cluster["dashboard"]  # worker processes: a distributed cluster
    assert every.read_bytes() == one.read_bytes()
    first = tmp_path / "gpu0" / "lora.safetensors"
    _extract(pair, first, "--gpus", "0")
    assert first.read_bytes() == one.read_bytes()

    merged = {}
    for name, extra in (("one", ["--device", "cuda"]), ("all", ["--gpus", "all"])):
        merged[name] = tmp_path / f"merged-{name}.safetensors"
        _merge(pair[0], one, merged[name], *extra)
    assert merged["all"].read_bytes() == merged["one"].read_bytes()
