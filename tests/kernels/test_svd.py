import math

import pytest
import torch

from loraforge.kernels import (
    full_svd,
    product_distance_sq,
    randomized_svd,
    seed_for,
    squared_norm,
)


def spectrum_matrix(m: int, n: int, singular_values: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(singular_values), generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, len(singular_values), generator=g)).Q
    return (u * singular_values) @ v.T


def slowly_decaying(k: int) -> torch.Tensor:
    head = torch.full((8,), 5.0)
    return torch.cat([head, 1.0 / torch.arange(1, k - 7).float() ** 0.5])


@pytest.mark.parametrize("rank", [8, 32])
def test_randomized_error_within_one_percent_of_optimal(rank):
    a = spectrum_matrix(700, 500, slowly_decaying(500))
    approx = randomized_svd(a, rank, generator=torch.Generator().manual_seed(1))
    optimal = full_svd(a, rank)
    assert approx.rel_error() <= 1.01 * optimal.rel_error()


def test_reported_error_is_the_actual_error():
    a = spectrum_matrix(300, 200, slowly_decaying(200))
    approx = randomized_svd(a, 16, generator=torch.Generator().manual_seed(0))
    actual = float((a - approx.up @ approx.down).double().norm() / a.double().norm())
    assert approx.rel_error() == pytest.approx(actual, rel=1e-4)
    assert approx.up.shape == (300, 16) and approx.down.shape == (16, 200)


def test_exact_low_rank_is_recovered():
    a = spectrum_matrix(200, 150, torch.tensor([3.0, 2.0, 1.0, 0.5]))
    approx = randomized_svd(a, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(approx.up @ approx.down, a, atol=1e-5)
    assert approx.rel_error() < 1e-3


def test_same_seed_same_bytes_and_seed_from_name_is_stable():
    a = spectrum_matrix(120, 90, slowly_decaying(90))
    assert seed_for("blocks.0.q.weight") == seed_for("blocks.0.q.weight")
    assert seed_for("blocks.0.q.weight") != seed_for("blocks.1.q.weight")
    runs = [
        randomized_svd(a, 8, generator=torch.Generator().manual_seed(seed_for("x")))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].up, runs[1].up) and torch.equal(runs[0].down, runs[1].down)


def test_rank_is_capped_and_small_matrices_use_the_exact_path():
    a = torch.randn(10, 6)
    approx = randomized_svd(a, 32)
    assert approx.rank == 6
    assert approx.rel_error() < 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        randomized_svd(torch.randn(4, 4), 0)
    with pytest.raises(ValueError, match="2-D"):
        full_svd(torch.randn(4, 4, 4), 2)


def test_squared_norm_accumulates_in_fp64():
    a = torch.full((4000, 5000), 0.1)
    exact = 4000 * 5000 * float(torch.tensor(0.1)) ** 2
    assert squared_norm(a) == pytest.approx(exact, rel=1e-6)
    assert math.isclose(squared_norm(torch.zeros(3, 3)), 0.0)


def test_product_distance_matches_the_dense_product():
    g = torch.Generator().manual_seed(0)
    ua, da = torch.randn(30, 4, generator=g), torch.randn(4, 20, generator=g)
    ub, db = ua.bfloat16().float(), da.bfloat16().float()
    dense = float(((ua.double() @ da.double()) - (ub.double() @ db.double())).norm() ** 2)
    assert product_distance_sq(ua, da, ub, db) == pytest.approx(dense, rel=1e-6)


@pytest.mark.gpu
def test_randomized_on_cuda_matches_cpu_accuracy():
    a = spectrum_matrix(700, 500, slowly_decaying(500))
    gpu = randomized_svd(a.cuda(), 16, generator=torch.Generator("cuda").manual_seed(0))
    assert gpu.up.device.type == "cuda"
    assert gpu.rel_error() <= 1.01 * full_svd(a, 16).rel_error()
