"""GPUs without running anything: choosing them (``--gpus``), the worker spec pinned to each,
the Dask resource a GPU task asks for, and the per-device lock and staging inside a task."""

from __future__ import annotations

import sys
import threading
import types

import pytest
import torch

from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.extract.task import stage_bytes as extract_stage_bytes
from loraforge.pipeline.merge.task import stage_bytes as merge_stage_bytes
from loraforge.pipeline.run import cluster as cluster_mod
from loraforge.pipeline.run import gpu, staging
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
    (same,) = stage([view], cpu, 1 << 20)
    assert same is view  # nothing to overlap on the CPU: the bytes are the mapped ones
    empty = torch.empty(0, 4)
    assert stage([empty], torch.device("cuda"))[0] is empty  # nothing to copy


@pytest.mark.gpu
def test_stage_copies_into_pinned_memory_for_a_gpu_task():
    view = torch.arange(6.0).view(2, 3)
    (staged,) = stage([view], torch.device("cuda"), 4096)
    assert staged is not view and staged.is_pinned()
    assert torch.equal(staged, view) and staged.shape == (2, 3)


# ---- which cluster --gpus starts, and the warning when it is not dask-cuda's ----
class _FakeCluster:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class _FakeSpecCluster(_FakeCluster):
    pass


@pytest.fixture
def fake_spec_cluster(monkeypatch):
    import distributed

    monkeypatch.setattr(distributed, "SpecCluster", _FakeSpecCluster)
    monkeypatch.delitem(sys.modules, "dask_cuda", raising=False)


def _fake_dask_cuda(monkeypatch, cluster_cls):
    module = types.ModuleType("dask_cuda")
    if cluster_cls is not None:
        module.LocalCUDACluster = cluster_cls
    monkeypatch.setitem(sys.modules, "dask_cuda", module)


def test_gpu_cluster_is_dask_cudas_when_it_starts(monkeypatch, fake_spec_cluster):
    class LocalCUDACluster(_FakeCluster):
        pass

    _fake_dask_cuda(monkeypatch, LocalCUDACluster)
    cluster, note = gpu.gpu_cluster(["0", "2"])
    assert type(cluster) is LocalCUDACluster and note is None
    assert cluster.kwargs["CUDA_VISIBLE_DEVICES"] == ["0", "2"]
    assert cluster.kwargs["resources"] == {GPU: 1}
    assert cluster.kwargs["threads_per_worker"] == gpu.GPU_THREADS


def test_gpu_cluster_falls_back_with_one_line_when_dask_cuda_fails_to_start(
    monkeypatch, fake_spec_cluster
):
    class LocalCUDACluster:
        def __init__(self, **kwargs):
            raise RuntimeError("NVML: driver not loaded\n(details)")

    _fake_dask_cuda(monkeypatch, LocalCUDACluster)
    cluster, note = gpu.gpu_cluster(["0"])
    assert type(cluster) is _FakeSpecCluster
    assert list(cluster.kwargs["workers"]) == ["gpu-0"]
    assert note == (
        "--gpus: dask-cuda's LocalCUDACluster failed to start (RuntimeError: NVML: driver not "
        "loaded (details)); running one nanny worker per GPU instead"
    )


def test_gpu_cluster_falls_back_when_dask_cuda_is_broken_or_missing(
    monkeypatch, tmp_path, fake_spec_cluster
):
    _fake_dask_cuda(monkeypatch, None)  # imports, but has no LocalCUDACluster
    cluster, note = gpu.gpu_cluster(["0"])
    assert type(cluster) is _FakeSpecCluster
    assert note.startswith("--gpus: dask-cuda failed to import (ImportError: cannot import name")
    assert note.endswith("; running one nanny worker per GPU instead")

    # a dependency of dask-cuda is missing: a failed import, not "not installed"
    monkeypatch.delitem(sys.modules, "dask_cuda")
    (tmp_path / "dask_cuda").mkdir()
    (tmp_path / "dask_cuda" / "__init__.py").write_text("import numba_absent_for_the_test\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cluster, note = gpu.gpu_cluster(["0"])
    assert type(cluster) is _FakeSpecCluster
    assert note == (
        "--gpus: dask-cuda failed to import (ModuleNotFoundError: No module named "
        "'numba_absent_for_the_test'); running one nanny worker per GPU instead"
    )
    monkeypatch.delitem(sys.modules, "dask_cuda", raising=False)

    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # not installed
    cluster, note = gpu.gpu_cluster(["0"])
    assert type(cluster) is _FakeSpecCluster
    assert note == (
        "--gpus: dask-cuda is not installed (pip install 'loraforge[gpu]'); "
        "running one nanny worker per GPU instead"
    )


def test_dask_client_hands_the_fallback_line_on(monkeypatch, capsys):
    import distributed

    closed = []

    class Client:
        def __init__(self, cluster):
            self.cluster = cluster

        def close(self):
            closed.append("client")

    class Cluster:
        def close(self):
            closed.append("cluster")

    monkeypatch.setattr(distributed, "Client", Client)
    monkeypatch.setattr(cluster_mod, "gpu_cluster", lambda gpus, threads: (Cluster(), "why"))
    seen = []
    with cluster_mod.dask_client(workers=None, device="cuda", gpus=["0"], on_warning=seen.append):
        pass
    assert seen == ["why"] and closed == ["client", "cluster"]
    assert capsys.readouterr().err == ""
    with cluster_mod.dask_client(workers=None, device="cuda", gpus=["0"]):
        pass  # no callback: one warning line on stderr, as the CLI prints warnings
    assert capsys.readouterr().err == "warning: why\n"


# ---- pinned staging: sized once per thread from the plan ----
def _in_fresh_thread(fn):
    """Run ``fn`` in a new thread (fresh thread-local buffers); re-raise what it raised."""
    out = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


@pytest.fixture
def fake_pinned(monkeypatch):
    calls = []

    def allocate(nbytes):
        calls.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)  # pageable: no CUDA here

    monkeypatch.setattr(staging, "_allocate_pinned", allocate)
    return calls


def test_staging_is_allocated_once_at_the_planned_size(fake_pinned):
    cuda = torch.device("cuda")
    small = [torch.arange(12, dtype=torch.bfloat16).view(3, 4), torch.ones(5, dtype=torch.float16)]
    large = [torch.randn(40, 30).to(torch.bfloat16), torch.randn(40, 30).to(torch.bfloat16)]
    planned = staging.staging_size([t.numel() * t.element_size() for t in large])
    assert planned == 2 * 2432  # 2400 bytes each, rounded up to 64

    def run():
        buffers = []
        for views in (small, large, small, large):  # the smaller task comes first
            staged = stage(views, cuda, planned)
            for view, copy in zip(views, staged, strict=True):
                assert copy is not view and copy.dtype == view.dtype
                assert copy.shape == view.shape and torch.equal(copy, view)
            buffers.append(staging.reserve_staging(0).data_ptr())
            # back to back in the one buffer, each on a 64-byte boundary
            assert (staged[1].data_ptr() - staged[0].data_ptr()) % staging.STAGE_ALIGN == 0
            assert staged[0].data_ptr() == buffers[-1]
        return buffers

    buffers = _in_fresh_thread(run)
    assert fake_pinned == [planned]  # one allocation per thread, at the plan's size
    assert len(set(buffers)) == 1
    _in_fresh_thread(lambda: stage(small, cuda, planned))
    assert fake_pinned == [planned, planned]  # another thread: its own buffer, same size


def test_staging_without_a_plan_size_and_a_later_larger_plan(fake_pinned):
    cuda = torch.device("cuda")
    view = torch.zeros(10, dtype=torch.float32)

    def run():
        stage([view], cuda)  # no plan size given: this task's own
        stage([view], cuda, 50)  # a smaller plan: the buffer is kept
        stage([view], cuda, 1000)  # a later, larger plan (long-lived worker): replaced once
        stage([torch.zeros(3)], cuda, 1000)

    _in_fresh_thread(run)
    assert fake_pinned == [64, 1000]


def test_stage_on_cpu_allocates_nothing(fake_pinned):
    views = [torch.arange(4.0), torch.arange(3.0)]
    staged = _in_fresh_thread(lambda: stage(views, torch.device("cpu"), 4096))
    assert all(a is b for a, b in zip(staged, views, strict=True)) and fake_pinned == []


def test_tasks_state_what_they_stage():
    info = types.SimpleNamespace
    extract = info(source=info(nbytes=100), target=info(nbytes=64))
    assert extract_stage_bytes(extract) == 128 + 64
    assert merge_stage_bytes(info(kind="merged", base=info(nbytes=65))) == 128
    assert merge_stage_bytes(info(kind="cast", base=info(nbytes=65))) == 0


def _staged_fn(size, stage_nbytes=None):
    return size, stage_nbytes


def test_run_tasks_gives_every_gpu_task_the_plans_largest_staging():
    calls = [
        cluster_mod.TaskCall(f"t{i}", _staged_fn, (size,), uses_gpu=gpu_task, stage_bytes=size)
        for i, (size, gpu_task) in enumerate([(10, True), (500, True), (7, True), (9000, False)])
    ]
    staged = cluster_mod.with_staging(calls)
    assert staged[3] is calls[3]  # a CPU task is left as it was: nothing staged
    done = {}
    cluster_mod.run_tasks(calls, done.__setitem__, workers=2, device="cpu")
    assert done == {"t0": (10, 500), "t1": (500, 500), "t2": (7, 500), "t3": (9000, None)}
    plain = [cluster_mod.TaskCall("p", _pinned_device_fn, (), uses_gpu=True)]
    assert cluster_mod.with_staging(plain) == plain  # no stage_bytes declared: unchanged


def _pinned_device_fn():
    return None
