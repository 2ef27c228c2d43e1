"""Rank selection from stored spectra: every mode against its formula on known spectra, the
budget's greedy allocation, and the flag-naming validation messages."""

import itertools

import pytest
import torch

from loraforge.kernels import RANK_MODES, RankRule, Spectrum, full_svd, kept_energy

# σ² = 64, 16, 4, 1 (sum 85) plus 15 outside the factored rank: ‖Δ‖² = 100
FOUR = Spectrum([8.0, 4.0, 2.0, 1.0], sq_norm=100.0, residual_sq=15.0, params_per_rank=10)


def exact(values, params_per_rank=10) -> Spectrum:
    """A spectrum with nothing outside its factored rank."""
    return Spectrum(values, sum(v * v for v in values), 0.0, params_per_rank)


def squared_error(spectra, ranks) -> float:
    return sum(
        s.residual_sq + sum(v * v for v in s.singular_values[k:])
        for s, k in zip(spectra, ranks, strict=True)
    )


def test_mode_names_in_order_with_their_flags():
    assert list(RANK_MODES) == ["fixed", "energy", "ratio", "threshold", "budget"]
    assert [(m.field, m.flag) for m in RANK_MODES.values()] == [
        (None, None),
        ("energy", "--energy"),
        ("sv_ratio", "--sv-ratio"),
        ("sv_threshold", "--sv-threshold"),
        ("rank_budget", "--rank-budget"),
    ]
    assert all(m.name == name and m.help.strip() for name, m in RANK_MODES.items())


@pytest.mark.parametrize(("rank", "expected"), [(1, 1), (3, 3), (4, 4), (32, 4)])
def test_fixed_is_the_rank_capped_by_the_spectrum(rank, expected):
    assert RankRule(rank=rank).choose([FOUR]) == [expected]


@pytest.mark.parametrize(
    ("energy", "expected"),
    [(0.5, 1), (0.64, 1), (0.65, 2), (0.8, 2), (0.84, 3), (0.85, 4), (0.9, 4), (1.0, 4)],
)
def test_energy_is_the_smallest_rank_reaching_the_fraction(energy, expected):
    assert RankRule("energy", energy=energy).choose([FOUR]) == [expected]


@pytest.mark.parametrize(("ratio", "expected"), [(1.0, 1), (1.9, 1), (2.0, 2), (4.0, 3), (8.0, 4)])
def test_ratio_keeps_values_within_the_factor_of_the_largest(ratio, expected):
    assert RankRule("ratio", sv_ratio=ratio).choose([FOUR]) == [expected]


@pytest.mark.parametrize(
    ("threshold", "expected"), [(0.0, 4), (1.0, 4), (2.0, 3), (2.5, 2), (8.0, 1)]
)
def test_threshold_keeps_values_at_or_above_it(threshold, expected):
    assert RankRule("threshold", sv_threshold=threshold).choose([FOUR]) == [expected]


def test_every_mode_is_floored_by_min_rank_and_capped_by_rank():
    spectra = [FOUR, exact([3.0, 0.0, 0.0])]
    assert RankRule("threshold", sv_threshold=100.0).choose(spectra) == [1, 1]
    assert RankRule("threshold", rank=3, min_rank=2, sv_threshold=100.0).choose(spectra) == [2, 2]
    assert RankRule("ratio", rank=3, min_rank=2, sv_ratio=1000.0).choose(spectra) == [3, 2]
    assert RankRule("energy", rank=2, energy=1.0).choose(spectra) == [2, 1]
    # a floor above a spectrum's length is cut to the length
    assert RankRule("fixed", rank=8, min_rank=5).choose([exact([1.0, 0.5])]) == [2]


def test_ratio_of_a_zero_spectrum_keeps_the_floor():
    assert RankRule("ratio", sv_ratio=2.0, min_rank=1).choose([exact([0.0, 0.0])]) == [1]


def test_kept_energy():
    assert kept_energy(FOUR, 0) == 0.0
    assert kept_energy(FOUR, 1) == 0.64
    assert kept_energy(FOUR, 2) == 0.8
    assert kept_energy(FOUR, 4) == 0.85
    assert kept_energy(exact([0.0]), 1) == 1.0


def test_budget_beats_fixed_rank_at_the_same_parameter_count():
    loud, quiet = exact([10.0, 9.0, 8.0, 7.0]), exact([1.0, 0.5, 0.25, 0.125])
    spectra = [loud, quiet]
    fixed = RankRule(rank=2).choose(spectra)
    budget = RankRule("budget", rank=4, rank_budget=40).choose(spectra)
    assert fixed == [2, 2] and budget == [3, 1]
    assert squared_error(spectra, fixed) == 113.078125  # 8² + 7² + 0.25² + 0.125²
    assert squared_error(spectra, budget) == 49.328125  # 7² + 0.5² + 0.25² + 0.125²


def test_budget_weighs_error_per_parameter():
    # equal σ, but the narrow tensor's ranks cost a tenth: it gets every rank it can use
    wide, narrow = exact([4.0, 4.0, 4.0], 100), exact([4.0, 4.0, 4.0], 10)
    assert RankRule("budget", rank=3, rank_budget=130).choose([wide, narrow]) == [1, 3]
    # the wide tensor's next rank (gain 0.16 a parameter) no longer fits; the narrow one's does
    big, small = exact([10.0, 10.0], 100), exact([1.0, 1.0], 10)
    assert RankRule("budget", rank=2, rank_budget=150).choose([big, small]) == [1, 2]


def test_budget_ties_go_to_the_earlier_tensor_and_zero_gains_are_not_bought():
    same = exact([2.0, 1.0])
    assert RankRule("budget", rank=2, rank_budget=30).choose([same, same]) == [2, 1]
    assert RankRule("budget", rank=3, rank_budget=1000).choose([exact([3.0, 0.0, 0.0])]) == [1]


def test_budget_never_exceeds_the_budget_and_spends_it_where_it_can():
    spectra = [exact([5.0, 3.0, 2.0, 1.0], 7), exact([4.0, 2.0, 1.5], 11), exact([6.0, 0.5], 13)]
    for budget in range(31, 80):
        ranks = RankRule("budget", rank=4, rank_budget=budget).choose(spectra)
        spent = sum(k * s.params_per_rank for k, s in zip(ranks, spectra, strict=True))
        assert spent <= budget
        assert all(1 <= k <= len(s.singular_values) for k, s in zip(ranks, spectra, strict=True))
    assert RankRule("budget", rank=4, rank_budget=79).choose(spectra) == [4, 3, 1]


@pytest.mark.parametrize("budget", [30, 50, 70, 90, 110])
def test_budget_with_equal_costs_is_the_least_error_of_all_rank_choices(budget):
    spectra = [exact([6.0, 2.0, 1.5, 1.0]), exact([3.0, 2.5, 2.0, 0.5]), exact([5.0, 0.5])]
    chosen = RankRule("budget", rank=4, rank_budget=budget).choose(spectra)
    least = min(
        squared_error(spectra, ranks)
        for ranks in itertools.product(range(1, 5), range(1, 5), range(1, 3))
        if 10 * sum(ranks) <= budget
    )
    assert squared_error(spectra, chosen) == least


def test_budget_below_the_floors_names_the_smallest_budget():
    spectra = [exact([1.0, 0.5], 100), exact([1.0], 28)]
    with pytest.raises(ValueError) as info:
        RankRule("budget", min_rank=2, rank=2, rank_budget=100).choose(spectra)
    assert str(info.value) == (
        "--rank-budget 100 is below the --min-rank 2 floors of 2 tensors; "
        "the smallest possible budget is 228"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"mode": "auto"},
            "unknown --rank-mode 'auto'; valid: fixed, energy, ratio, threshold, budget",
        ),
        ({"rank": 0}, "--rank must be >= 1, got 0"),
        ({"min_rank": 0}, "--min-rank must be in [1, --rank 32], got 0"),
        ({"min_rank": 40}, "--min-rank must be in [1, --rank 32], got 40"),
        ({"mode": "energy"}, "--rank-mode energy needs --energy"),
        ({"mode": "ratio"}, "--rank-mode ratio needs --sv-ratio"),
        ({"mode": "threshold"}, "--rank-mode threshold needs --sv-threshold"),
        ({"mode": "budget"}, "--rank-mode budget needs --rank-budget"),
        ({"energy": 0.5}, "--energy applies only to --rank-mode energy"),
        (
            {"mode": "ratio", "sv_ratio": 2.0, "rank_budget": 9},
            "--rank-budget applies only to --rank-mode budget",
        ),
        ({"mode": "energy", "energy": 1.5}, "--energy must be in (0, 1], got 1.5"),
        ({"mode": "energy", "energy": 0.0}, "--energy must be in (0, 1], got 0.0"),
        ({"mode": "energy", "energy": float("nan")}, "--energy must be in (0, 1], got nan"),
        ({"mode": "ratio", "sv_ratio": 0.5}, "--sv-ratio must be >= 1, got 0.5"),
        ({"mode": "threshold", "sv_threshold": -1.0}, "--sv-threshold must be >= 0, got -1.0"),
        ({"mode": "budget", "rank_budget": 0}, "--rank-budget must be >= 1, got 0"),
    ],
)
def test_validation_names_the_flag(fields, message):
    with pytest.raises(ValueError) as info:
        RankRule(**fields)
    assert str(info.value) == message


def test_spectrum_validation_and_from_a_factorisation():
    with pytest.raises(ValueError, match="descending"):
        Spectrum([1.0, 2.0], 5.0, 0.0, 4)
    with pytest.raises(ValueError, match=">= 0"):
        Spectrum([1.0, -0.5], 5.0, 0.0, 4)
    with pytest.raises(ValueError, match="params_per_rank must be >= 1, got 0"):
        Spectrum([1.0], 1.0, 0.0, 0)
    a = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0]))[:, :3].contiguous()  # 4×3
    s = Spectrum.of(full_svd(a, 2))
    assert s.singular_values == (3.0, 2.0)
    assert (s.sq_norm, s.params_per_rank) == (14.0, 7)
    assert s.residual_sq == pytest.approx(1.0, abs=1e-6)
