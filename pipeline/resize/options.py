"""What decides a resize's output: the rank rule and the output options (as extract's). Frozen,
round-tripping through plain dicts for the report. Nothing here changes the stored results:
the refactoring is exact and keeps the whole spectrum, so every option is a re-export."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from loraforge.kernels import RankRule

from ..io.dtypes import check_output_format, parse_dtype
from ..lora.rank_options import checked_ranks, rank_rule
from ..lora.styles import DEFAULT_STYLE, KeyStyle, check_output, key_style


@dataclass(frozen=True)
class ResizeOptions:
    rank_rule: RankRule  # its rank: the largest cap
    ranks: tuple[int, ...] = ()  # one output per cap (--rank 16,32); () = (rank_rule.rank,)
    output_dtype: str = "bf16"
    output_format: str = "safetensors"
    max_shard_size: int | None = None
    key_style: str = DEFAULT_STYLE  # output key names (lora/styles.py)
    allow_nonfinite: bool = False

    def __post_init__(self):
        if isinstance(self.rank_rule, dict):
            object.__setattr__(self, "rank_rule", rank_rule(**self.rank_rule))
        ranks = checked_ranks(self.ranks, self.rank_rule, "rule's rank")
        object.__setattr__(self, "ranks", ranks)
        parse_dtype(self.output_dtype)
        check_output_format(self.output_format, self.max_shard_size)
        check_output(key_style(self.key_style), self.output_format, self.max_shard_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.output_dtype)

    @property
    def style(self) -> KeyStyle:
        return key_style(self.key_style)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
