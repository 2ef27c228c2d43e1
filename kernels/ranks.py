"""Choosing each tensor's rank from its stored spectrum (``--rank-mode``).

Every mode decides from numbers a factorisation already produced (singular values, ‖Δ‖², the
residual of all factored components), so changing mode, threshold or budget never recomputes
an SVD. All modes are capped by the factorisation rank (``--rank``, and the spectrum's length)
and floored by ``--min-rank``.

``budget`` is the one global mode: each extra rank of a tensor removes σ²ₖ₊₁ of squared error
and costs ``out + in`` parameters, so ranks are handed out greedily by removed error per
parameter across all tensors (a max-heap; ties go to the earlier tensor; a rank that no longer
fits is skipped and cheaper ones are still bought). As σ² only falls within a tensor, this is
the least total squared error for the size unless a rank had to be skipped (the greedy then
meets the fractional bound), and then above the least by at most the first skipped rank's σ².

Validation raises ``ValueError`` naming the flag; the pipeline turns it into its usage error.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from .svd import LowRank


@dataclass(frozen=True)
class Spectrum:
    """What rank selection needs of one factored tensor."""

    singular_values: Sequence[float]  # descending; length = factored rank (the cap)
    sq_norm: float  # ‖Δ‖_F² (fp64)
    residual_sq: float  # ‖Δ − all factored components‖_F²
    params_per_rank: int  # out + in: parameters one extra rank costs

    def __post_init__(self):
        values = tuple(float(s) for s in self.singular_values)
        if any(s < 0 or math.isnan(s) for s in values):
            raise ValueError("singular values must be >= 0")
        if any(a < b for a, b in zip(values, values[1:], strict=False)):
            raise ValueError("singular values must be in descending order")
        if self.params_per_rank < 1:
            raise ValueError(f"params_per_rank must be >= 1, got {self.params_per_rank}")
        object.__setattr__(self, "singular_values", values)

    @classmethod
    def of(cls, low: LowRank) -> Spectrum:
        """The spectrum of a factorisation (fp32 singular values, read as float)."""
        return cls(
            tuple(low.singular_values.double().tolist()),
            low.sq_norm,
            low.residual_sq,
            low.up.shape[0] + low.down.shape[1],
        )


def kept_energy(s: Spectrum, rank: int) -> float:
    """Fraction of ‖Δ‖² kept by the leading ``rank`` components: 1 − residual / ‖Δ‖²."""
    if s.sq_norm <= 0.0:
        return 1.0
    dropped = math.fsum(v * v for v in s.singular_values[rank:])
    return 1.0 - max(s.residual_sq + dropped, 0.0) / s.sq_norm


@dataclass(frozen=True)
class RankMode:
    name: str
    help: str
    field: str | None  # the RankRule field holding the mode's value
    flag: str | None  # the CLI flag that sets it
    select: Callable[[RankRule, Sequence[Spectrum]], list[int]]


@dataclass(frozen=True)
class RankRule:
    """How ranks are chosen; validated on construction (``ValueError`` naming the flag)."""

    mode: str = "fixed"
    rank: int = 32  # cap (the factorisation rank)
    min_rank: int = 1  # floor
    energy: float | None = None  # --energy F in (0, 1]
    sv_ratio: float | None = None  # --sv-ratio R >= 1
    sv_threshold: float | None = None  # --sv-threshold T >= 0
    rank_budget: int | None = None  # --rank-budget N parameters over all factors

    def __post_init__(self):
        if self.mode not in RANK_MODES:
            raise ValueError(f"unknown --rank-mode {self.mode!r}; valid: {', '.join(RANK_MODES)}")
        if self.rank < 1:
            raise ValueError(f"--rank must be >= 1, got {self.rank}")
        if not 1 <= self.min_rank <= self.rank:
            raise ValueError(f"--min-rank must be in [1, --rank {self.rank}], got {self.min_rank}")
        wanted = RANK_MODES[self.mode]
        for mode in RANK_MODES.values():
            if mode.field is None:
                continue
            value = getattr(self, mode.field)
            if mode is wanted and value is None:
                raise ValueError(f"--rank-mode {self.mode} needs {mode.flag}")
            if mode is not wanted and value is not None:
                raise ValueError(f"{mode.flag} applies only to --rank-mode {mode.name}")
        _check_value(self)

    def choose(self, spectra: Sequence[Spectrum]) -> list[int]:
        """One rank per spectrum, in order."""
        return RANK_MODES[self.mode].select(self, spectra)


def _check_value(rule: RankRule) -> None:
    if rule.energy is not None and not 0.0 < rule.energy <= 1.0:
        raise ValueError(f"--energy must be in (0, 1], got {rule.energy}")
    if rule.sv_ratio is not None and not rule.sv_ratio >= 1.0:
        raise ValueError(f"--sv-ratio must be >= 1, got {rule.sv_ratio}")
    if rule.sv_threshold is not None and not rule.sv_threshold >= 0.0:
        raise ValueError(f"--sv-threshold must be >= 0, got {rule.sv_threshold}")
    if rule.rank_budget is not None and rule.rank_budget < 1:
        raise ValueError(f"--rank-budget must be >= 1, got {rule.rank_budget}")


def _cap(rule: RankRule, s: Spectrum) -> int:
    return min(rule.rank, len(s.singular_values))


def _clamp(rule: RankRule, s: Spectrum, k: int) -> int:
    cap = _cap(rule, s)
    return max(min(k, cap), min(rule.min_rank, cap))


def _per_tensor(count: Callable[[RankRule, Spectrum], int]):
    def select(rule: RankRule, spectra: Sequence[Spectrum]) -> list[int]:
        return [_clamp(rule, s, count(rule, s)) for s in spectra]

    return select


def _fixed(rule: RankRule, s: Spectrum) -> int:
    return rule.rank


def _energy(rule: RankRule, s: Spectrum) -> int:
    """Smallest k whose leading σ² reach F·‖Δ‖² (all of them when none do)."""
    goal = rule.energy * s.sq_norm
    sums = accumulate(v * v for v in s.singular_values)
    return next((k for k, total in enumerate(sums, 1) if total >= goal), len(s.singular_values))


def _ratio(rule: RankRule, s: Spectrum) -> int:
    """Leading σᵢ > 0 with σ₁/σᵢ ≤ R (written σ₁ ≤ R·σᵢ: no division)."""
    values = s.singular_values
    return sum(1 for v in values if v > 0.0 and values[0] <= rule.sv_ratio * v)


def _threshold(rule: RankRule, s: Spectrum) -> int:
    return sum(1 for v in s.singular_values if v >= rule.sv_threshold)


def _budget(rule: RankRule, spectra: Sequence[Spectrum]) -> list[int]:
    ranks = [min(rule.min_rank, _cap(rule, s)) for s in spectra]
    floor = sum(k * s.params_per_rank for k, s in zip(ranks, spectra, strict=True))
    if floor > rule.rank_budget:
        raise ValueError(
            f"--rank-budget {rule.rank_budget} is below the --min-rank {rule.min_rank} floors "
            f"of {len(spectra)} tensors; the smallest possible budget is {floor}"
        )
    left = rule.rank_budget - floor
    heap = [
        (-_gain(s, k), j)
        for j, (s, k) in enumerate(zip(spectra, ranks, strict=True))
        if k < _cap(rule, s)
    ]
    heapq.heapify(heap)
    while heap:
        gain, j = heapq.heappop(heap)
        s = spectra[j]
        if gain >= 0.0 or s.params_per_rank > left:
            continue  # nothing to remove, or this tensor's ranks no longer fit
        left -= s.params_per_rank
        ranks[j] += 1
        if ranks[j] < _cap(rule, s):
            heapq.heappush(heap, (-_gain(s, ranks[j]), j))
    return ranks


def _gain(s: Spectrum, k: int) -> float:
    """Squared error the (k+1)-th component removes per parameter it costs."""
    v = s.singular_values[k]
    return v * v / s.params_per_rank


RANK_MODES: dict[str, RankMode] = {
    m.name: m
    for m in (
        RankMode(
            "fixed", "the same rank (--rank) for every tensor", None, None, _per_tensor(_fixed)
        ),
        RankMode(
            "energy",
            "smallest rank keeping fraction F of each delta's squared norm",
            "energy",
            "--energy",
            _per_tensor(_energy),
        ),
        RankMode(
            "ratio",
            "keep singular values within a factor R of the largest (kohya's sv_ratio)",
            "sv_ratio",
            "--sv-ratio",
            _per_tensor(_ratio),
        ),
        RankMode(
            "threshold",
            "keep singular values >= T (LyCORIS)",
            "sv_threshold",
            "--sv-threshold",
            _per_tensor(_threshold),
        ),
        RankMode(
            "budget",
            "N parameters over all factors, ranks placed where they remove the most error",
            "rank_budget",
            "--rank-budget",
            _budget,
        ),
    )
}
