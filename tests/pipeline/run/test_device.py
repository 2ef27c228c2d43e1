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
    assert pick_device("auto") == "cuda"
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1"
