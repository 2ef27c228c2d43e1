"""How a run writes its LoRA files (``extract``, ``resize``): the rank rule and caps, output
dtype, format, shards and key style. Frozen and checked on creation; both commands' options
are these plus their own."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from loraforge.kernels import RankRule

from ..io.dtypes import check_output_format, parse_dtype
from ..lora.styles import DEFAULT_STYLE, KeyStyle, check_output, key_style
from .ranks import checked_ranks, ranked_outputs, rule_from
from .writer import config_file


@dataclass(frozen=True, kw_only=True)
class LoraOutput:
    rank_rule: RankRule | None = None  # None: fixed at the largest cap (normalised on creation)
    ranks: tuple[int, ...] = ()  # one output per cap (--rank 16,32,64); () = the rule's rank
    output_dtype: str = "bf16"
    output_format: str = "safetensors"
    max_shard_size: int | None = None
    key_style: str = DEFAULT_STYLE  # output key names (lora/styles.py)

    def check_output(self, rank: int, cap: str) -> None:
        """Normalise the rule (a dict or None becomes a ``RankRule`` at ``rank``) and the caps
        (``cap`` names ``rank`` in errors), and check dtype, format and style together."""
        object.__setattr__(self, "rank_rule", rule_from(self.rank_rule, rank))
        object.__setattr__(self, "ranks", checked_ranks(self.ranks, self.rank_rule, cap))
        parse_dtype(self.output_dtype)
        check_output_format(self.output_format, self.max_shard_size)
        check_output(key_style(self.key_style), self.output_format, self.max_shard_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.output_dtype)

    @property
    def style(self) -> KeyStyle:
        return key_style(self.key_style)

    def paths(self, output: str) -> dict[int, str]:
        """Per cap, its output path (``ranks.ranked_outputs``)."""
        return ranked_outputs(output, self.ranks, self.style.directory)

    def written_beside(self, output: str) -> list[str]:
        """Every file the run writes beside ``output`` (checked against the inputs before it
        starts): the other caps' outputs (``--rank 16,32``) and PEFT configs."""
        files = []
        for path in self.paths(output).values():
            files += [f for f in (path, config_file(path, self.style)) if f]
        return [f for f in files if f != output]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
