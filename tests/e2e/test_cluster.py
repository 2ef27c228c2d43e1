"""Running on Dask clusters: a real scheduler and two real worker processes on 127.0.0.1
(``dask scheduler`` / ``dask worker``) give the same bytes as a local run, for extract and
merge; a worker killed mid-run has its tasks rescheduled; a bad tensor fails the run with its
one line; local runs give the same bytes for any number of threads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from loraforge.pipeline.run.cluster import dashboard_link
from tests.helpers import markers
from tests.helpers.checkpoints import MIN_PARAMS, pair_tensors
from tests.helpers.cli import run_cli
from tests.helpers.worker_faults import KillWorkerOnce

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.slow


def _start(args: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the nanny and its worker die together
            env={**os.environ, **(env or {})},
        )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler and two single-threaded workers (each under its nanny, as users run them),
    as separate processes; every process group is killed at the end."""
    from distributed import Client

    where = tmp_path_factory.mktemp("cluster")
    scheduler_file = str(where / "scheduler.json")
    # Workers import the test-only fault plugin by name (tests.helpers.worker_faults).
    env = {"PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    processes = [
        _start(
            [
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                scheduler_file,
            ],
            str(where / "scheduler.log"),
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(scheduler_file):
            assert time.monotonic() < deadline, "the scheduler did not start"
            assert processes[0].poll() is None, (where / "scheduler.log").read_text()
            time.sleep(0.05)
        for i in range(2):
            worker = ["worker", "--scheduler-file", scheduler_file, "--host", "127.0.0.1"]
            worker += ["--nthreads", "1", "--no-dashboard", "--name", f"w{i}"]
            processes.append(_start(worker, str(where / f"worker{i}.log"), env))
        with Client(scheduler_file=scheduler_file, timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            address = client.scheduler.address
        yield {"file": scheduler_file, "address": address}
    finally:
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)


@pytest.fixture
def many(tmp_path):
    """The tiny pair plus eight more low-rank tensors, so a run has work for both workers."""
    base, tuned = pair_tensors()
    g = torch.Generator().manual_seed(7)
    for i in range(8):
        w = torch.randn(128, 96, generator=g) * 0.02
        base[f"extra.{i}.weight"] = w.bfloat16()
        tuned[f"extra.{i}.weight"] = (w + torch.randn(128, 96, generator=g) * 1e-3).bfloat16()
    paths = str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    save_file(base, paths[0])
    save_file(tuned, paths[1])
    return paths


def extract(models, output, *extra):
    result = run_cli(
        "extract",
        "--source-model",
        models[0],
        "--target-model",
        models[1],
        "--output",
        output,
        "--lowrank-min-params",
        MIN_PARAMS,
        "--rank",
        8,
        "--device",
        "cpu",
        *extra,
    )
    assert result.exit_code == 0, result.stderr
    return result


def merge(base, lora, output, *extra):
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
        "--device",
        "cpu",
        *extra,
    )
    assert result.exit_code == 0, result.stderr
    return result


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_workers_1_and_3_give_identical_bytes(many, tmp_path):
    one, three = (str(tmp_path / f"w{n}" / "lora.safetensors") for n in (1, 3))
    extract(many, one, "--workers", "1", "--quiet")
    extract(many, three, "--workers", "3", "--quiet")
    assert read(one) == read(three)
    merged = [str(tmp_path / f"m{n}" / "merged.safetensors") for n in (1, 3)]
    merge(many[0], one, merged[0], "--workers", "1", "--quiet")
    merge(many[0], one, merged[1], "--workers", "3", "--quiet")
    assert read(merged[0]) == read(merged[1])


def test_remote_cluster_gives_the_local_bytes(cluster, many, tmp_path):
    local = str(tmp_path / "local" / "lora.safetensors")
    extract(many, local, "--workers", "1", "--quiet")

    # extract through the scheduler file, with JSON events
    remote = str(tmp_path / "remote" / "lora.safetensors")
    result = extract(many, remote, "--scheduler", cluster["file"], "--json")
    assert read(remote) == read(local)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    (info,) = [e for e in events if e["event"] == "cluster"]
    assert info["dashboard"].startswith("http://127.0.0.1:")
    summary = events[-1]
    assert summary["event"] == "summary" and summary["computed"] == summary["status"]["computed"]
    # the workers wrote the intermediates into the (shared) work directory
    assert markers.count(remote + ".work") == summary["computed"]

    # merge through the address, with the human output: the dashboard link is printed
    merged_local = str(tmp_path / "local" / "merged.safetensors")
    merged_remote = str(tmp_path / "remote" / "merged.safetensors")
    merge(many[0], local, merged_local, "--workers", "2", "--quiet")
    result = merge(many[0], local, merged_remote, "--scheduler", cluster["address"])
    assert "Dask dashboard: http://127.0.0.1:" in result.stderr
    assert read(merged_remote) == read(merged_local)


@pytest.mark.parametrize("command", ["extract", "merge"])
def test_worker_killed_mid_run_is_rescheduled(cluster, many, tmp_path, command):
    from distributed import Client

    lora = str(tmp_path / "lora.safetensors")
    extract(many, lora, "--workers", "2", "--quiet")
    token = tmp_path / "killed"
    key = ("lowrank-" if command == "extract" else "merged-") + "extra.3.weight"
    with Client(cluster["address"], timeout=30) as client:
        client.wait_for_workers(2, timeout=60)  # a worker killed earlier is back (nanny)
        client.register_plugin(KillWorkerOnce(key, str(token)))
    try:
        output = str(tmp_path / "remote" / f"{command}.safetensors")
        if command == "extract":
            extract(many, output, "--scheduler", cluster["address"], "--quiet")
            expected = read(lora)
        else:
            merge(many[0], lora, output, "--scheduler", cluster["address"], "--quiet")
            local = str(tmp_path / "local.safetensors")
            merge(many[0], lora, local, "--workers", "1", "--quiet")
            expected = read(local)
    finally:
        with Client(cluster["address"], timeout=30) as client:
            client.unregister_worker_plugin(KillWorkerOnce.name)
    assert token.exists(), "no worker was killed"
    assert read(output) == expected


def test_bad_tensor_on_a_cluster_fails_with_its_one_line(cluster, tmp_path):
    base, tuned = pair_tensors()
    good = tuned["blocks.0.ffn.0.weight"].clone()
    tuned["blocks.0.ffn.0.weight"][3, 4] = float("nan")
    paths = str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    save_file(base, paths[0])
    save_file(tuned, paths[1])
    output = str(tmp_path / "out" / "lora.safetensors")
    result = run_cli(
        "extract",
        "--source-model",
        paths[0],
        "--target-model",
        paths[1],
        "--output",
        output,
        "--lowrank-min-params",
        MIN_PARAMS,
        "--rank",
        8,
        "--scheduler",
        cluster["address"],
        "--device",
        "cpu",
        "--json",
    )
    assert result.exit_code == 1  # the tensor's own error: failed, not retried
    line = (
        f"{paths[1]}: tensor 'blocks.0.ffn.0.weight': holds NaN or Inf, so the delta is not "
        "finite (fix or re-save the checkpoint)"
    )
    assert result.stderr.splitlines() == [f"error: {line}"]
    error = json.loads(result.stdout.splitlines()[-1])
    assert (error["event"], error["message"], error["exit_code"]) == ("error", line, 1)
    assert not os.path.exists(output)
    saved = markers.count(output + ".work")  # what finished before the failure

    # fixed in place (same header and size): the rerun reuses what was saved
    tuned["blocks.0.ffn.0.weight"] = good
    save_file(tuned, paths[1])
    result = extract(paths, output, "--scheduler", cluster["address"], "--json")
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["reused"] >= saved and summary["computed"] >= 1
    local = str(tmp_path / "local" / "lora.safetensors")
    extract(paths, local, "--workers", "1", "--quiet")
    assert read(output) == read(local)


def test_missing_scheduler_file_is_one_usage_line(pair_files, tmp_path):
    args = ["extract", "--source-model", pair_files[0], "--target-model", pair_files[1]]
    args += ["--output", tmp_path / "lora.safetensors", "--device", "cpu"]
    result = run_cli(*args, "--scheduler", str(tmp_path / "nowhere.json"))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: --scheduler {tmp_path / 'nowhere.json'}: no such scheduler file, and not an "
        "address (give tcp://HOST:PORT or the path of a file written by dask scheduler)"
    ]


def test_cuda_on_a_cluster_without_gpu_workers_is_one_line(cluster, pair_files, tmp_path):
    from distributed import Client

    args = ["extract", "--source-model", pair_files[0], "--target-model", pair_files[1], "--quiet"]
    args += ["--output", tmp_path / "lora.safetensors", "--device", "cuda"]
    with Client(cluster["address"], timeout=30) as client:
        client.wait_for_workers(2, timeout=60)  # a worker killed earlier is back (nanny)
    result = run_cli(*args, "--scheduler", cluster["file"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {cluster['address']}: none of the 2 workers declares the GPU resource, so no "
        "tensor could run on cuda (start one worker per GPU with --resources GPU=1, or pass "
        "--device cpu)"
    ]
    assert not os.path.exists(tmp_path / "lora.safetensors")


def test_a_remote_cluster_shows_its_dashboard(cluster):
    from distributed import Client

    with Client(cluster["address"], timeout=30) as client:
        assert dashboard_link(client).startswith("http://127.0.0.1:")
