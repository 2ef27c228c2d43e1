"""What decides a merge's output bytes, plus how strictly inputs are checked."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..io.dtypes import check_output_format, parse_dtype
from ..lora.numbers import checked


@dataclass(frozen=True)
class MergeOptions:
    alpha: float = 1.0  # global multiplier of every LoRA's delta (LightX2V's --alpha)
    output_dtype: str = "bf16"  # or fp8_e4m3fn: scaled fp8 in the base's convention (plan.py)
    output_format: str = "safetensors"
    max_shard_size: int | None = None
    strict: bool = False
    allow_nonfinite: bool = False

    def __post_init__(self):
        checked(self.alpha, "--alpha")
        parse_dtype(self.output_dtype, fp8=True)
        check_output_format(self.output_format, self.max_shard_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.output_dtype, fp8=True)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
