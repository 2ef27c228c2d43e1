import pytest
import torch

from loraforge.kernels import precision
from loraforge.kernels.precision import SKETCH_CHOICES, cpu_flags, sketch_dtype


def test_named_precisions_are_taken_as_given_on_any_device():
    assert SKETCH_CHOICES == ("auto", "bf16", "fp32")
    for device in ("cpu", "cuda", "meta"):
        assert sketch_dtype("bf16", device) == torch.bfloat16
        assert sketch_dtype("fp32", device) == torch.float32


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"avx2", "fma", "avx512f", "avx512_bf16"}, torch.bfloat16),  # Zen 4, Cooper Lake
        ({"avx2", "amx_tile", "amx_bf16"}, torch.bfloat16),  # Sapphire Rapids
        ({"avx2", "fma", "avx512f", "avx512bw"}, torch.float32),  # AVX-512 without BF16
        ({"avx2", "fma"}, torch.float32),
        (set(), torch.float32),  # not Linux, or /proc/cpuinfo unreadable
    ],
)
def test_auto_is_bf16_only_on_cpus_that_multiply_it_natively(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))
    assert sketch_dtype("auto", "cpu") == expected
    assert sketch_dtype("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((7, 0), torch.float32),
        ((7, 5), torch.float32),
        ((8, 0), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ],
)
def test_auto_on_a_gpu_is_bf16_from_ampere_on(monkeypatch, capability, expected):
    seen = []
    monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda device=None: seen.append(device) or capability
    )
    assert sketch_dtype("auto", "cuda:1") == expected
    assert seen == [torch.device("cuda", 1)]


def test_auto_on_other_devices_is_fp32():
    assert sketch_dtype("auto", "meta") == torch.float32


def test_cpu_flags_are_this_machines():
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no x86 flags in /proc/cpuinfo here")
    assert cpu_flags() == frozenset(line.split(":", 1)[1].split())
    assert "fpu" in cpu_flags()
