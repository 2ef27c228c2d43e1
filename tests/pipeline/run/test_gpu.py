"""GPUs without running anything: choosing them (``--gpus``), the worker spec pinned to each,
the Dask resource a GPU task asks for, and the per-device lock and staging inside a task."""

from __future__ import annotations

import pytest
import torch

from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.run import gpu
from loraforge.pipeline.run.gpu import GPU, GPU_SHARE, task_resources
from loraforge.pipeline.run.staging import device_lock, stage


def test_select_gpus_maps_torch_indices_to_visible_devices():
    assert gpu.select_gpus("all", ["0", "1", "2"]) == ["0", "1", "2"]
    assert gpu.select_gpus("ALL", ["3"]) == ["3"]
    assert gpu.select_gpus("0,2", ["4", "5", "6"]) == ["4", "6"]
    assert gpu.select_gpus("2,0", ["4", "5", "6"]) == ["6", "4"]
    assert gpu.select_gpus(" 1 ", ["GPU-a", "GPU-b"]) == ["GPU-b"]


@pytest.mark.parametrize(
    "spec, visible, message",
    [
        ("all", [], "--gpus all: no CUDA device is visible (drop --gpus, or use --device cpu)"),
        ("0", [], "--gpus 0: no CUDA device is visible (drop --gpus, or use --device cpu)"),
        ("2", ["0", "1"], "--gpus 2: no GPU 2; 2 visible (0-1)"),
        ("-1", ["0", "1"], "--gpus -1: no GPU -1; 2 visible (0-1)"),
        ("0,0", ["0", "1"], "--gpus 0,0: a GPU is listed twice"),
        ("first", ["0"], "cannot read --gpus 'first'; write all, or GPU indices such as 0,1"),
        ("", ["0"], "cannot read --gpus ''; write all, or GPU indices such as 0,1"),
    ],
)
def test_select_gpus_refuses_with_one_line(spec, visible, message):
    with pytest.raises(UsageError) as raised:
        gpu.select_gpus(spec, visible)
    assert str(raised.value) == message
    assert raised.value.exit_code == 2


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu.visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    assert gpu.visible_gpus() == ["3", "7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 7 ,9")  # more listed than torch sees
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
        assert options["host"] == "127.0.0.1"
    assert gpu.gpu_worker_specs(["1"], threads=3)["gpu-1"]["options"]["nthreads"] == 3
    # two GPU tasks fit one GPU worker's resource: one reads while the other computes
    assert 1 / task_resources(True)[GPU] == gpu.GPU_THREADS


def test_task_resources_are_the_one_mapping():
    assert task_resources(False) is None
    assert task_resources(True) == {GPU: GPU_SHARE} == {"GPU": 0.5}


def test_device_lock_is_per_device_and_absent_on_cpu():
    cpu = torch.device("cpu")
    with device_lock(cpu):
        with device_lock(cpu):  # no lock: CPU tasks run side by side
            pass
    first = device_lock(torch.device("cuda"))
    assert first is device_lock(torch.device("cuda:0"))
    assert first is not device_lock(torch.device("cuda:1"))
    with first:  # a real lock: held, a second acquire without waiting fails
        assert first.acquire(blocking=False) is False
    assert first.acquire(blocking=False) is True
    first.release()


def test_stage_is_the_mapped_view_itself_on_cpu():
    cpu = torch.device("cpu")
    view = torch.arange(6.0).view(2, 3)
    assert stage(view, "source", cpu) is view  # nothing to overlap on the CPU
    empty = torch.empty(0, 4)
    assert stage(empty, "source", torch.device("cuda")) is empty  # nothing to copy


@pytest.mark.gpu
def test_stage_copies_into_pinned_memory_for_a_gpu_task():
    view = torch.arange(6.0).view(2, 3)
    staged = stage(view, "source", torch.device("cuda"))
    assert staged is not view and staged.is_pinned()
    assert torch.equal(staged, view) and staged.shape == (2, 3)
