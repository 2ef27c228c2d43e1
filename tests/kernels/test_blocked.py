"""RowBlocks: the randomized SVD over a matrix read a block of rows at a time equals the dense
one up to summation order."""

import pytest
import torch

from loraforge.kernels import (
    DenseOperator,
    RowBlocks,
    SvdSettings,
    randomized_svd,
    randomized_svd_op,
)


def _matrix(m=600, n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    decay = torch.arange(1, n + 1, dtype=torch.float32) ** -0.7
    return torch.randn(m, n, generator=g) @ torch.diag(decay) @ torch.randn(n, n, generator=g)


@pytest.mark.parametrize("block_rows", [37, 128, 600, 1000])
def test_products_equal_the_dense_operators(block_rows):
    a = _matrix()
    blocks = RowBlocks(lambda s, e: a[s:e], a.shape, block_rows)
    dense = DenseOperator(a)
    x, y = torch.randn(300, 5), torch.randn(600, 5)
    torch.testing.assert_close(blocks.matmul(x), dense.matmul(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocks.rmatmul(y), dense.rmatmul(y), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(blocks.project(y), dense.project(y), rtol=1e-5, atol=1e-4)
    assert blocks.sq_norm() == pytest.approx(dense.sq_norm(), rel=1e-7)  # fp64 sums of fp32 parts


@pytest.mark.parametrize("n_iter", [2, None])
def test_blocked_svd_equals_the_dense_one(n_iter):
    """Row blocks have no lowered copy (a bf16 sketch is asked for and not used): every pass
    is fp32, as the dense fp32 sketch's."""
    a = _matrix()
    blocks = RowBlocks(lambda s, e: a[s:e], a.shape, 97)
    got = randomized_svd_op(
        blocks,
        16,
        SvdSettings(n_iter=n_iter, sketch="bf16"),
        generator=torch.Generator().manual_seed(5),
    )
    want = randomized_svd(
        a, 16, SvdSettings(n_iter=n_iter, sketch="fp32"), generator=torch.Generator().manual_seed(5)
    )
    assert got.iterations == want.iterations
    torch.testing.assert_close(got.singular_values, want.singular_values, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.up @ got.down, want.up @ want.down, rtol=1e-4, atol=1e-4)
    assert got.residual_sq == pytest.approx(want.residual_sq, rel=1e-5)
    assert blocks.blocks == 7


def test_passes_are_counted_and_stats_read_once():
    a = _matrix()
    blocks = RowBlocks(lambda s, e: a[s:e], a.shape, 100)
    randomized_svd_op(blocks, 8, SvdSettings(n_iter=2), generator=torch.Generator().manual_seed(0))
    # stats, A·Ω, two power iterations (Aᵀ·Q then A·Q), Qᵀ·A; the residual is the cheap identity
    assert blocks.passes == 1 + 1 + 4 + 1


def test_max_abs_sees_a_nan_in_any_block():
    a = _matrix()
    a[450, 3] = float("nan")
    assert torch.isnan(torch.tensor(RowBlocks(lambda s, e: a[s:e], a.shape, 100).max_abs()))


def test_block_rows_must_be_positive():
    with pytest.raises(ValueError, match="block_rows must be >= 1, got 0"):
        RowBlocks(lambda s, e: None, (4, 4), 0)
