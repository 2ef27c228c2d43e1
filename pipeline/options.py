"""Frozen run options that reject unknown fields and round-trip through plain dicts, so they
can be hashed for resume and stored beside the intermediates."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch

from .errors import UsageError

OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
OUTPUT_FORMATS = ("safetensors", "pytorch")
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return OUTPUT_DTYPES[name.lower()]
    except KeyError:
        raise UsageError(f"unknown dtype {name!r}; valid: {', '.join(OUTPUT_DTYPES)}") from None


def parse_size(text: str | int | None) -> int | None:
    """'5GB' → 5·10⁹ bytes (Hugging Face's convention), '2GiB' → 2·2³⁰; None/'0' → no limit."""
    if text is None or isinstance(text, int):
        return text or None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise UsageError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    return size or None


class _Frozen:
    """Mixin: ``to_dict``/``from_dict`` with unknown fields refused."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(
                f"{cls.__name__}: unknown field(s) {', '.join(unknown)}; "
                f"valid: {', '.join(sorted(names))}"
            )
        return cls(**data)


@dataclass(frozen=True)
class KernelOptions(_Frozen):
    """Everything that decides the numbers of a low-rank factorisation."""

    method: str = "randomized"
    rank: int = 32
    oversample: int = 16
    n_iter: int = 2

    def __post_init__(self):
        if self.rank < 1:
            raise UsageError(f"--rank must be >= 1, got {self.rank}")
        if self.method not in ("randomized", "full"):
            raise UsageError(f"unknown --svd {self.method!r}; valid: randomized, full")
        if self.oversample < 0 or self.n_iter < 0:
            raise UsageError("--oversample and --power-iterations must be >= 0")


@dataclass(frozen=True)
class ExtractOptions(_Frozen):
    kernel: KernelOptions = KernelOptions()
    lowrank_min_params: int = 1_000_000
    diff_only: bool = False
    output_dtype: str = "bf16"
    output_format: str = "safetensors"
    max_shard_size: int | None = None

    def __post_init__(self):
        if isinstance(self.kernel, dict):
            object.__setattr__(self, "kernel", KernelOptions.from_dict(self.kernel))
        parse_dtype(self.output_dtype)
        if self.output_format not in OUTPUT_FORMATS:
            raise UsageError(
                f"unknown --output-format {self.output_format!r}; "
                f"valid: {', '.join(OUTPUT_FORMATS)}"
            )
        if self.lowrank_min_params < 0:
            raise UsageError("--lowrank-min-params must be >= 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.output_dtype)


@dataclass(frozen=True)
class MergeOptions(_Frozen):
    """Everything that decides a merge's output bytes, plus how strictly inputs are checked."""

    alpha: float = 1.0  # global multiplier of every LoRA's delta (LightX2V's --alpha)
    output_dtype: str = "bf16"
    output_format: str = "safetensors"
    max_shard_size: int | None = None
    strict: bool = False
    allow_nonfinite: bool = False

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise UsageError(f"--alpha must be a number, got {self.alpha!r}")
        if not math.isfinite(self.alpha):
            raise UsageError(f"--alpha must be finite, got {self.alpha}")
        parse_dtype(self.output_dtype)
        if self.output_format not in OUTPUT_FORMATS:
            raise UsageError(
                f"unknown --output-format {self.output_format!r}; "
                f"valid: {', '.join(OUTPUT_FORMATS)}"
            )
        if self.output_format == "pytorch" and self.max_shard_size:
            raise UsageError("--max-shard-size needs --output-format safetensors")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.output_dtype)
