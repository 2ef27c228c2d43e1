"""``resolve_device``: the device a run's tasks use, decided before any work starts, and its
refusals, each one line (``UsageError``, exit code 2). CUDA is faked, so these run anywhere."""

from __future__ import annotations

import pytest
import torch

from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.run import device as device_module
from loraforge.pipeline.run.device import pick_device, resolve_device


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "visible_gpus", lambda: [])


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_module, "visible_gpus", lambda: ["0", "1"])


def refusal(**kwargs) -> str:
    device = kwargs.pop("device", "auto")
    with pytest.raises(UsageError) as raised:
        resolve_device(device, **kwargs)
    assert raised.value.exit_code == 2
    assert isinstance(raised.value, ValueError)  # what a library caller catches
    return str(raised.value)


@pytest.mark.parametrize("device", ["auto", "cuda", "cpu"])
def test_gpus_with_scheduler_is_refused(two_gpus, device):
    assert refusal(device=device, gpus="all", scheduler="tcp://127.0.0.1:1") == (
        "--gpus starts local GPU workers and cannot be combined with --scheduler "
        "(start the cluster's workers one per GPU with --resources GPU=1)"
    )


@pytest.mark.parametrize("device", ["cpu", "cuda:1"])
def test_gpus_with_another_device_is_refused(two_gpus, device):
    assert refusal(device=device, gpus="0") == (
        f"--gpus picks the GPUs; --device {device} contradicts it "
        "(drop --device, or pass --device cuda)"
    )


def test_gpus_without_a_visible_gpu_is_refused(no_cuda):
    assert refusal(gpus="all") == (
        "--gpus all: no CUDA device is visible (drop --gpus, or use --device cpu)"
    )


def test_gpus_run_on_cuda(two_gpus):
    assert resolve_device("auto", gpus="all") == "cuda"
    assert resolve_device("cuda", gpus="1") == "cuda"
    assert refusal(gpus="2") == "--gpus 2: no GPU 2; 2 visible (0-1)"


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_refused(no_cuda, device):
    assert refusal(device=device) == (
        f"--device {device}: no CUDA device is visible (use --device cpu or auto)"
    )


@pytest.mark.parametrize("device", ["tpu", "CPU", "mps", ""])
def test_unknown_device_is_refused(no_cuda, device):
    assert refusal(device=device) == (
        f"unknown --device {device!r}; valid: auto, cpu, cuda, cuda:N"
    )


def test_auto_is_cuda_only_where_a_gpu_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("auto") == "cuda"
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"


@pytest.fixture
def one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(device_module, "visible_gpus", lambda: ["0"])


def test_gpu_index_must_be_visible(one_gpu, monkeypatch):
    assert resolve_device("cuda:0") == "cuda:0"
    assert resolve_device("cuda") == "cuda"
    assert refusal(device="cuda:1") == (
        "--device cuda:1: no GPU 1; 1 visible (use --device cuda or cuda:0)"
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert resolve_device("cuda:3") == "cuda:3"
    assert refusal(device="cuda:4") == (
        "--device cuda:4: no GPU 4; 4 visible (use --device cuda or cuda:0 to cuda:3)"
    )


@pytest.mark.parametrize("index", ["x", "", "-1", "1.0", " 1", "0,1"])
def test_malformed_gpu_index_is_refused(one_gpu, index):
    assert refusal(device=f"cuda:{index}") == (
        f"--device 'cuda:{index}': {index!r} is not a GPU index; "
        "valid: auto, cpu, cuda, cuda:N (N = 0, 1, ...)"
    )


@pytest.mark.parametrize("index", [0, 1])
def test_gpu_index_with_scheduler_is_refused_before_connecting(one_gpu, monkeypatch, index):
    def connect(*args):
        raise AssertionError("the cluster must not be contacted")

    monkeypatch.setattr(device_module, "cluster_device", connect)
    assert refusal(device=f"cuda:{index}", scheduler="tcp://127.0.0.1:1") == (
        f"--device cuda:{index} cannot be used with --scheduler: the cluster's workers are one "
        "per GPU and each sees its own GPU as cuda (pass --device cuda)"
    )


def test_scheduler_devices_are_the_clusters(no_cuda, monkeypatch):
    seen = []
    monkeypatch.setattr(device_module, "cluster_device", lambda s, d: seen.append((s, d)) or "cuda")
    assert resolve_device("cuda", scheduler="sched.json") == "cuda"
    assert resolve_device("auto", scheduler="sched.json") == "cuda"
    assert seen == [("sched.json", "cuda"), ("sched.json", "auto")]


@pytest.mark.parametrize(
    "extra, line",
    [
        (
            ["--device", "cuda:1"],
            "--device cuda:1: no GPU 1; 1 visible (use --device cuda or cuda:0)",
        ),
        (
            ["--device", "cuda:x"],
            "--device 'cuda:x': 'x' is not a GPU index; valid: auto, cpu, cuda, cuda:N "
            "(N = 0, 1, ...)",
        ),
        (
            ["--device", "cuda:1", "--scheduler", "tcp://127.0.0.1:1"],
            "--device cuda:1 cannot be used with --scheduler: the cluster's workers are one per "
            "GPU and each sees its own GPU as cuda (pass --device cuda)",
        ),
    ],
)
@pytest.mark.parametrize("command", ["extract", "merge"])
def test_cli_refuses_in_one_line_before_reading_inputs(one_gpu, tmp_path, command, extra, line):
    from tests.helpers.cli import run_cli

    second = "--target-model" if command == "extract" else "--lora-model"
    result = run_cli(
        command,
        "--source-model",
        tmp_path / "missing-a.safetensors",
        second,
        tmp_path / "missing-b.safetensors",
        "--output",
        tmp_path / "out.safetensors",
        *extra,
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [f"error: {line}"]
    assert not (tmp_path / "out.safetensors").exists()


def test_device_type_drops_the_gpu_index():
    """What resume fingerprints record (extract's low-rank tensors, merge's components)."""
    from loraforge.pipeline.run.device import device_type

    assert [device_type(d) for d in ("cpu", "cuda", "cuda:0", "cuda:7")] == [
        "cpu",
        "cuda",
        "cuda",
        "cuda",
    ]
