"""In which dtype the randomized SVD's sketch products run (``SvdSettings.sketch``).

The power iterations only need the dominant subspace, not fp32 digits: rounding the delta to
bf16 moves a few parts per million of its energy (u²/3 with u = 2⁻⁸), far below what a rank-r
truncation leaves, and the last two products before the factors stay fp32 (svd.py). bf16
products pay where the hardware multiplies bf16 natively: on this project's 2-core Zen 4
(AVX512-BF16) an 8960×1536 by 1536×48 product takes 6.7 ms against 21.5 ms in fp32, on one
thread. Without native bf16 (AVX2, AVX-512 without BF16, GPUs before Ampere) the libraries
emulate it, slower than fp32, so ``auto`` chooses fp32 there."""

from __future__ import annotations

import functools

import torch

SKETCH_CHOICES = ("auto", "bf16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# /proc/cpuinfo flags of x86 cores that multiply bf16 natively (oneDNN uses them).
_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def sketch_dtype(choice: str, device: torch.device | str) -> torch.dtype:
    """The dtype ``choice`` (one of ``SKETCH_CHOICES``) means on ``device``: ``auto`` is bf16
    where the device multiplies it natively, fp32 elsewhere."""
    if choice != "auto":
        return _DTYPES[choice]
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device) >= (8, 0)
    else:
        native = device.type == "cpu" and bool(_BF16_CPU_FLAGS & cpu_flags())
    return torch.bfloat16 if native else torch.float32


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
