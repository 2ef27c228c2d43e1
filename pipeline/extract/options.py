"""What decides an extraction's numbers and output: frozen, unknown fields refused, and
round-tripping through plain dicts so they can be hashed for resume and stored in reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from loraforge.kernels import SVD_METHODS

from ..errors import UsageError
from ..io.dtypes import check_output_format, parse_dtype


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
        if self.method not in SVD_METHODS:
            raise UsageError(f"unknown --svd {self.method!r}; valid: {', '.join(SVD_METHODS)}")
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
        check_output_format(self.output_format, self.max_shard_size)
        if self.lowrank_min_params < 0:
            raise UsageError("--lowrank-min-params must be >= 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.output_dtype)
