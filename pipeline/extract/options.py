"""What decides an extraction's numbers and output: frozen, unknown fields refused, and
round-tripping through plain dicts so they can be hashed for resume and stored in reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from loraforge.kernels import SVD_METHODS, RankRule, SvdSettings

from ..errors import UsageError
from ..io.dtypes import check_output_format, parse_dtype
from ..lora.rank_options import checked_ranks, rule_from
from ..lora.styles import DEFAULT_STYLE, KeyStyle, check_output, key_style


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
class KernelOptions(SvdSettings, _Frozen):
    """Everything that decides the numbers of a low-rank factorisation: the method, the rank,
    and the kernel's ``SvdSettings`` (``--oversample``, ``--power-iterations``, ``--svd-tol``,
    ``--max-power-iterations``), which it is, so it goes to the kernel as it is."""

    method: str = "randomized"
    rank: int = 32

    def __post_init__(self):
        if self.rank < 1:
            raise UsageError(f"--rank must be >= 1, got {self.rank}")
        if self.method not in SVD_METHODS:
            raise UsageError(f"unknown --svd {self.method!r}; valid: {', '.join(SVD_METHODS)}")
        if self.oversample < 0 or (self.n_iter is not None and self.n_iter < 0):
            raise UsageError("--oversample and --power-iterations must be >= 0")
        if not self.tol > 0.0:
            raise UsageError(f"--svd-tol must be > 0, got {self.tol}")
        if self.max_iter < 1:
            raise UsageError(f"--max-power-iterations must be >= 1, got {self.max_iter}")


@dataclass(frozen=True)
class ExtractOptions(_Frozen):
    """What decides an extraction's output. The rank rule is applied at export from the
    stored spectra, so it is not part of what a resume compares (``resume.py``)."""

    kernel: KernelOptions = KernelOptions()
    rank_rule: RankRule | None = None  # None: fixed at kernel.rank (normalised on creation)
    ranks: tuple[int, ...] = ()  # one output per cap (--rank 16,32,64); () = (kernel.rank,)
    lowrank_min_params: int = 1_000_000
    diff_only: bool = False
    output_dtype: str = "bf16"
    output_format: str = "safetensors"
    max_shard_size: int | None = None
    key_style: str = DEFAULT_STYLE  # output key names (lora/styles.py); not in resume's check

    def __post_init__(self):
        if isinstance(self.kernel, dict):
            object.__setattr__(self, "kernel", KernelOptions.from_dict(self.kernel))
        object.__setattr__(self, "rank_rule", rule_from(self.rank_rule, self.kernel.rank))
        ranks = checked_ranks(self.ranks, self.rank_rule, "kernel rank")
        object.__setattr__(self, "ranks", ranks)
        parse_dtype(self.output_dtype)
        check_output_format(self.output_format, self.max_shard_size)
        check_output(key_style(self.key_style), self.output_format, self.max_shard_size)
        if self.lowrank_min_params < 0:
            raise UsageError("--lowrank-min-params must be >= 0")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.output_dtype)

    @property
    def style(self) -> KeyStyle:
        return key_style(self.key_style)
