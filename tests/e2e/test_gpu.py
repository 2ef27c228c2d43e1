"""GPUs end to end: one pinned worker process per GPU, started for real; ``--gpus`` and
``--device`` on the CLI; and, on a machine with CUDA (tests marked gpu), extract and merge on
cuda and ``--gpus`` runs that give the bytes of a one-GPU run. Choosing GPUs, worker specs and
the device lock are unit-tested in tests/pipeline/run/."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from loraforge.pipeline.run.cluster import dashboard_link
from loraforge.pipeline.run.gpu import GPU, gpu_cluster, task_resources
from tests.helpers.checkpoints import MIN_PARAMS
from tests.helpers.cli import run_cli
from tests.helpers.reference import apply_reference, read_report

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


# ---- one worker process per GPU ----
def _pinned_device() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.slow
def test_gpu_cluster_starts_pinned_worker_processes(monkeypatch):
    """The fallback without dask-cuda, started for real (no GPU needed to start it)."""
    from distributed import Client

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails: the SpecCluster path
    cluster, note = gpu_cluster(["0", "1"])
    assert type(cluster).__name__ == "SpecCluster"
    assert note == (
        "--gpus: dask-cuda is not installed (pip install 'loraforge[gpu]'); "
        "running one nanny worker per GPU instead"
    )
    with cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        pinned = client.run(_pinned_device)
        assert sorted(pinned.values()) == ["0", "1"]
        assert all(pid != os.getpid() for pid in client.run(os.getpid).values())
        workers = client.scheduler_info()["workers"].values()
        assert [w["resources"] for w in workers] == [{GPU: 1}, {GPU: 1}]
        assert [w["nthreads"] for w in workers] == [2, 2]
        # a distributed cluster: its dashboard is shown
        assert dashboard_link(client).startswith("http://127.0.0.1:")
        future = client.submit(_pinned_device, resources=task_resources(True), pure=False)
        assert future.result(timeout=60) in ("0", "1")


# ---- the CLI without CUDA ----
def _extract_args(models, tmp_path):
    return [
        "extract",
        "--source-model",
        models[0],
        "--target-model",
        models[1],
        "--output",
        tmp_path / "lora.safetensors",
    ]


@no_cuda
def test_gpus_without_cuda_is_one_usage_line(pair_files, tmp_path):
    for args in (
        _extract_args(pair_files, tmp_path),
        ["merge", "--source-model", pair_files[0], "--lora-model", pair_files[1]]
        + ["--output", tmp_path / "merged.safetensors"],
    ):
        result = run_cli(*args, "--gpus", "all")
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [
            "error: --gpus all: no CUDA device is visible (drop --gpus, or use --device cpu)"
        ]
        assert not os.path.exists(tmp_path / "lora.safetensors")
        assert not os.path.exists(tmp_path / "merged.safetensors")


def test_gpus_contradicting_device_or_scheduler_is_one_usage_line(pair_files, tmp_path):
    args = _extract_args(pair_files, tmp_path)
    result = run_cli(*args, "--gpus", "0", "--device", "cpu")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: --gpus picks the GPUs; --device cpu contradicts it "
        "(drop --device, or pass --device cuda)"
    ]
    result = run_cli(*args, "--gpus", "all", "--scheduler", "tcp://127.0.0.1:1")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: --gpus starts local GPU workers and cannot be combined with --scheduler "
        "(start the cluster's workers one per GPU with --resources GPU=1)"
    ]
    assert not os.path.exists(tmp_path / "lora.safetensors")


def test_help_shows_gpus_and_json():
    for command in ("extract", "merge"):
        result = run_cli(command, "--help")
        assert result.exit_code == 0
        assert "--gpus" in result.output and "--json" in result.output


# ---- on CUDA ----
def _extract(models, output, *extra) -> dict:
    result = run_cli(
        *_extract_args(models, output.parent)[:-1],
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
def test_extract_on_cuda_reproduces_the_target_and_repeats_bytes(pair_files, tmp_path):
    first = tmp_path / "a" / "lora.safetensors"
    report = _extract(pair_files, first, "--device", "cuda", "--output-dtype", "fp32")
    assert report["summary"]["device"] == "cuda"
    base, tuned = load_file(pair_files[0]), load_file(pair_files[1])
    merged = apply_reference(base, load_file(first))
    for key, entry in report["tensors"].items():
        if entry["kind"] in ("lowrank", "diff"):
            error = float((merged[key] - tuned[key].float()).norm())
            delta = float((tuned[key].float() - base[key].float()).norm())
            assert error <= entry["rel_error"] * delta * 1.05 + 1e-6, key
    second = tmp_path / "b" / "lora.safetensors"
    _extract(pair_files, second, "--device", "cuda", "--output-dtype", "fp32", "--workers", "3")
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.gpu
def test_merge_on_cuda_matches_cpu_within_fp32_rounding(pair_files, tmp_path):
    lora = tmp_path / "lora.safetensors"
    _extract(pair_files, lora, "--device", "cpu")
    on_cpu, on_gpu = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    _merge(pair_files[0], lora, on_cpu, "--device", "cpu")
    _merge(pair_files[0], lora, on_gpu, "--device", "cuda")
    cpu, cuda = load_file(on_cpu), load_file(on_gpu)
    assert cpu.keys() == cuda.keys()
    for key in cpu:
        torch.testing.assert_close(cuda[key], cpu[key], rtol=1e-5, atol=1e-6)
    again = tmp_path / "gpu2.safetensors"
    _merge(pair_files[0], lora, again, "--device", "cuda", "--workers", "3")
    assert again.read_bytes() == on_gpu.read_bytes()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpus_all_gives_the_bytes_of_one_gpu(pair_files, tmp_path):
    one = tmp_path / "one" / "lora.safetensors"
    _extract(pair_files, one, "--device", "cuda", "--workers", "1")
    every = tmp_path / "all" / "lora.safetensors"
    result = run_cli(
        *_extract_args(pair_files, every.parent)[:-1],
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
    # which cluster ran: dask-cuda's when it imports, else the fallback, said in one line
    fallback = [line for line in result.stderr.splitlines() if line.startswith("warning: --gpus:")]
    try:
        import dask_cuda  # noqa: F401
    except Exception:  # noqa: BLE001 - broken or missing: --gpus must have said so
        assert len(fallback) == 1, result.stderr
        assert fallback[0].endswith("; running one nanny worker per GPU instead")
    else:
        assert fallback == [], result.stderr
    assert every.read_bytes() == one.read_bytes()
    first = tmp_path / "gpu0" / "lora.safetensors"
    _extract(pair_files, first, "--gpus", "0")
    assert first.read_bytes() == one.read_bytes()

    merged = {}
    for name, extra in (("one", ["--device", "cuda"]), ("all", ["--gpus", "all"])):
        merged[name] = tmp_path / f"merged-{name}.safetensors"
        _merge(pair_files[0], one, merged[name], *extra)
    assert merged["all"].read_bytes() == merged["one"].read_bytes()
