"""refactor_sum: the SVD of a weighted sum of LoRA products from QR of the stacked factors
equals the dense fp64 SVD of the sum, and one LoRA refactored at its own rank is itself."""

import pytest
import torch

from loraforge.kernels import LowRank, refactor_sum


def lora(m: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g), torch.randn(r, n, generator=g) / 4


def dense_sum(ups, downs, factors) -> torch.Tensor:
    return sum(f * u.double() @ d.double() for u, d, f in zip(ups, downs, factors, strict=True))


@pytest.fixture
def three():
    pairs = [lora(40, 30, 4, 0), lora(40, 30, 6, 1), lora(40, 30, 5, 2)]
    return [u for u, _ in pairs], [d for _, d in pairs], [1.0, -0.5, 2.0]


def test_full_spectrum_equals_the_dense_svd_of_the_sum(three):
    ups, downs, factors = three
    dense = dense_sum(ups, downs, factors)
    result = refactor_sum(ups, downs, factors)
    assert isinstance(result, LowRank) and result.rank == 15 and result.iterations == 0
    assert result.up.dtype == torch.float32 and result.down.shape == (15, 30)
    s = torch.linalg.svdvals(dense)
    assert torch.allclose(result.singular_values.double(), s[:15], rtol=1e-6, atol=1e-6 * s[0])
    assert result.sq_norm == pytest.approx(float((dense * dense).sum()), rel=1e-12)
    assert result.residual_sq == 0.0
    product = result.up.double() @ result.down.double()
    assert float((product - dense).abs().max()) <= 1e-5 * float(dense.abs().max())


def test_truncation_is_the_best_low_rank_approximation_with_its_exact_residual(three):
    ups, downs, factors = three
    dense = dense_sum(ups, downs, factors)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    result = refactor_sum(ups, downs, factors, rank=5)
    assert result.rank == 5 and result.up.shape == (40, 5)
    assert result.residual_sq == pytest.approx(float((s[5:] ** 2).sum()), rel=1e-10)
    assert result.rel_error() == pytest.approx(float((s[5:] ** 2).sum() / (s**2).sum()) ** 0.5)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    product = result.up.double() @ result.down.double()
    assert float((product - best).abs().max()) <= 1e-5 * float(best.abs().max())


def test_one_lora_at_its_own_rank_is_reproduced_within_rounding():
    up, down = lora(64, 48, 8, 3)
    result = refactor_sum([up], [down], [1.0], rank=8)
    exact = up.double() @ down.double()
    product = result.up.double() @ result.down.double()
    assert result.rank == 8 and result.residual_sq == 0.0
    assert float((product - exact).abs().max()) <= 4 * torch.finfo(torch.float32).eps * float(
        exact.abs().max()
    )


def test_stacked_rank_above_the_matrix_size_gives_the_matrix_rank():
    ups, downs = zip(lora(10, 8, 6, 4), lora(10, 8, 6, 5), strict=True)
    result = refactor_sum(ups, downs, [1.0, 1.0])
    assert result.rank == 8 and result.up.shape == (10, 8) and result.down.shape == (8, 8)
    dense = dense_sum(ups, downs, [1.0, 1.0])
    assert torch.allclose(result.up.double() @ result.down.double(), dense, atol=1e-5)


def test_opposite_loras_cancel():
    up, down = lora(20, 12, 3, 6)
    result = refactor_sum([up, up], [down, down], [1.0, -1.0], rank=3)
    assert result.sq_norm < 1e-20
    assert float(result.singular_values.max()) < 1e-6


@pytest.mark.parametrize(
    ("ups", "downs", "factors", "rank", "message"),
    [
        ([], [], [], None, "as many ups, downs and factors (at least one), got 0, 0, 0"),
        ([torch.ones(4, 2)], [torch.ones(2, 3)], [1.0, 2.0], None, "got 1, 1, 2"),
        (
            [torch.ones(4, 2), torch.ones(5, 2)],
            [torch.ones(2, 3), torch.ones(2, 3)],
            [1.0, 1.0],
            None,
            "term 1: up (5, 2) and down (2, 3) do not form a 4x3 product",
        ),
        ([torch.ones(4, 2)], [torch.ones(3, 3)], [1.0], None, "term 0: up has rank 2, down has 3"),
        ([torch.ones(4, 2)], [torch.ones(2, 3)], [float("inf")], None, "factors must be finite"),
        ([torch.ones(4, 2)], [torch.ones(2, 3)], [1.0], 0, "rank must be >= 1, got 0"),
    ],
)
def test_bad_arguments(ups, downs, factors, rank, message):
    with pytest.raises(ValueError) as info:
        refactor_sum(ups, downs, factors, rank)
    assert message in str(info.value)
