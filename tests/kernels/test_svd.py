import math

import pytest
import torch

from loraforge.kernels import (
    DenseOperator,
    SvdSettings,
    full_svd,
    randomized_svd,
    randomized_svd_op,
    rounding_distance_sq,
    seed_for,
    squared_norm,
)
from loraforge.kernels.svd import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    MIN_AUTO_ITER,
    LoweredProducts,
    Passes,
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_distance_matches_the_dense_product(dtype):
    g = torch.Generator().manual_seed(0)
    ua, da = torch.randn(3000, 32, generator=g), torch.randn(32, 2000, generator=g) / 50
    ub, db = ua.to(dtype), da.to(dtype)
    dense = float(((ua.double() @ da.double()) - (ub.double() @ db.double())).norm() ** 2)
    assert rounding_distance_sq(ua, da, ub, db) == pytest.approx(dense, rel=1e-5, abs=0.0)


def power_law(n: int, p: float) -> torch.Tensor:
    return torch.arange(1, n + 1, dtype=torch.float32) ** -p


def todays_randomized_svd(a: torch.Tensor, rank: int, oversample: int, n_iter: int, generator):
    """The fixed-iteration kernel as it was before adaptive iterations, op for op."""
    m, n = a.shape
    k = min(rank, m, n)
    q = min(k + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, device=a.device, dtype=torch.float32)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(n_iter):
        basis = torch.linalg.qr(a.T @ basis).Q
        basis = torch.linalg.qr(a @ basis).Q
    small_u, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    u = basis @ small_u[:, :k]
    root = s[:k].sqrt()
    return (u * root.unsqueeze(0)).contiguous(), (root.unsqueeze(1) * vh[:k]).contiguous(), s[:k]


@pytest.mark.parametrize("n_iter", [0, 1, 2, 3])
def test_fixed_iterations_keep_todays_bytes(n_iter):
    a = spectrum_matrix(300, 200, slowly_decaying(200))
    up, down, s = todays_randomized_svd(a, 16, 16, n_iter, torch.Generator().manual_seed(5))
    settings = SvdSettings(n_iter=n_iter, sketch="fp32")
    dense = randomized_svd(a, 16, settings, generator=torch.Generator().manual_seed(5))
    op = randomized_svd_op(
        DenseOperator(a), 16, settings, generator=torch.Generator().manual_seed(5)
    )
    for result in (dense, op):
        assert torch.equal(result.up, up) and torch.equal(result.down, down)
        assert torch.equal(result.singular_values, s)
        assert result.iterations == n_iter


def bf16_sketched_svd(a: torch.Tensor, rank: int, n_iter: int, generator):
    """The fixed-iteration kernel with a bf16 sketch, op for op: A·Ω and every half-step but
    the last on a bf16 copy of A (operands rounded to bf16, products back to fp32), the last
    half-step and the projection in fp32."""
    low = a.to(torch.bfloat16)

    def matmul(index: int, x: torch.Tensor) -> torch.Tensor:
        return (low @ x.to(torch.bfloat16)).float() if index < 2 * n_iter else a @ x

    def rmatmul(index: int, y: torch.Tensor) -> torch.Tensor:
        return (y.to(torch.bfloat16).T @ low).T.float() if index < 2 * n_iter else a.T @ y

    k, q = rank, rank + 16
    omega = torch.randn(a.shape[1], q, generator=generator, dtype=torch.float32)
    basis = torch.linalg.qr(matmul(0, omega)).Q
    for i in range(n_iter):
        basis = torch.linalg.qr(rmatmul(2 * i + 1, basis)).Q
        basis = torch.linalg.qr(matmul(2 * i + 2, basis)).Q
    small_u, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    root = s[:k].sqrt()
    return (basis @ small_u[:, :k]) * root, root.unsqueeze(1) * vh[:k], s[:k]


@pytest.mark.parametrize("n_iter", [0, 1, 2])
def test_a_bf16_sketch_runs_all_but_the_last_half_step_in_bf16(n_iter):
    a = spectrum_matrix(300, 200, slowly_decaying(200))
    up, down, s = bf16_sketched_svd(a, 16, n_iter, torch.Generator().manual_seed(5))
    got = randomized_svd(
        a, 16, SvdSettings(n_iter=n_iter, sketch="bf16"), generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(got.up, up) and torch.equal(got.down, down)
    assert torch.equal(got.singular_values, s)
    fp32 = randomized_svd(
        a, 16, SvdSettings(n_iter=n_iter, sketch="fp32"), generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(got.up, fp32.up) == (n_iter == 0)  # A·Ω is the last product at 0


class CountingOperator(DenseOperator):
    def __init__(self, a):
        super().__init__(a)
        self.lowered_copies = 0

    def lowered(self, dtype):
        self.lowered_copies += 1
        return super().lowered(dtype)


def test_passes_lower_a_once_and_only_before_the_exact_ones():
    op = CountingOperator(torch.randn(6, 4))
    passes = Passes(op, torch.bfloat16, 3)
    early = [passes.products(i) for i in range(3)]
    assert all(p is early[0] for p in early) and isinstance(early[0], LoweredProducts)
    assert early[0].low.dtype == torch.bfloat16 and torch.equal(early[0].low, op.a.bfloat16())
    assert passes.products(3) is op and passes.products(7) is op
    assert op.lowered_copies == 1
    fp32 = CountingOperator(torch.randn(6, 4))
    assert Passes(fp32, torch.float32, 3).products(0) is fp32 and fp32.lowered_copies == 0


def test_the_lowered_copy_goes_into_the_given_scratch():
    a = spectrum_matrix(120, 90, slowly_decaying(90))
    buffer = torch.zeros(120, 90, dtype=torch.bfloat16)
    asked = []

    def scratch(shape, dtype):
        asked.append((shape, dtype))
        return buffer

    randomized_svd(a, 8, SvdSettings(sketch="bf16"), scratch=scratch)
    assert asked == [((120, 90), torch.bfloat16)]
    assert torch.equal(buffer, a.bfloat16())
    randomized_svd(a, 8, SvdSettings(sketch="fp32"), scratch=scratch)
    assert len(asked) == 1  # an fp32 sketch needs no copy


@pytest.mark.parametrize(
    "values",
    [torch.tensor([3.0, 2.0, 1.0, 0.5]), power_law(200, 2.0), power_law(200, 1.0)],
    ids=["exactly rank 4", "i^-2", "i^-1"],
)
@pytest.mark.parametrize("n_iter", [None, 1, 2])
def test_a_bf16_sketch_is_as_accurate_as_fp32_even_when_nearly_low_rank(values, n_iter):
    """bf16 rounding tilts the basis by ~2⁻⁹, which alone would leave an error of that size on
    a (nearly) low-rank matrix: the two fp32 products at the end remove it."""
    a = spectrum_matrix(300, 200, values)
    errors = {}
    for sketch in ("fp32", "bf16"):
        result = randomized_svd(
            a,
            8,
            SvdSettings(n_iter=n_iter, sketch=sketch),
            generator=torch.Generator().manual_seed(2),
        )
        actual = (a - result.up @ result.down).double().norm() / a.double().norm()
        errors[sketch] = float(actual)
    assert errors["bf16"] <= errors["fp32"] * (1 + 1e-4) + 1e-6


def test_adaptive_defaults():
    assert (DEFAULT_TOL, DEFAULT_MAX_ITER, MIN_AUTO_ITER) == (0.003, 4, 2)


@pytest.mark.parametrize(
    ("sketch", "name", "p", "iterations"),
    [
        ("fp32", "fast", 2.0, 2.0),
        ("fp32", "i^-1", 1.0, 2.0),
        ("fp32", "i^-0.3", 0.3, 2.5),
        # the first fp32 half-step also removes the bf16 sketch's tilt: a fast spectrum, which
        # has little else to gain, sees that as progress and takes half a step more
        ("bf16", "fast", 2.0, 2.5),
        ("bf16", "i^-1", 1.0, 2.0),
        ("bf16", "i^-0.3", 0.3, 2.5),
    ],
)
def test_adaptive_iterates_as_long_as_the_spectrum_needs(sketch, name, p, iterations):
    a = spectrum_matrix(600, 400, power_law(400, p))
    optimal = full_svd(a, 16).rel_error()
    fixed = randomized_svd(
        a, 16, SvdSettings(n_iter=2, sketch=sketch), generator=torch.Generator().manual_seed(1)
    )
    auto = randomized_svd(
        a, 16, SvdSettings(n_iter=None, sketch=sketch), generator=torch.Generator().manual_seed(1)
    )
    assert auto.iterations == iterations
    assert auto.rel_error() <= 1.002 * optimal
    assert auto.rel_error() <= fixed.rel_error() * (1 + 1e-5)  # same basis at 2.0, rounding


def test_adaptive_fixes_what_two_iterations_miss():
    a = spectrum_matrix(600, 400, power_law(400, 0.3))
    optimal = full_svd(a, 16).rel_error()
    fixed = randomized_svd(a, 16, SvdSettings(n_iter=2), generator=torch.Generator().manual_seed(0))
    auto = randomized_svd(
        a, 16, SvdSettings(n_iter=None), generator=torch.Generator().manual_seed(0)
    )
    assert fixed.rel_error() > 1.002 * optimal
    assert auto.rel_error() < 1.0015 * optimal


def test_adaptive_can_stop_half_way_through_an_iteration():
    """At 2.5 iterations the factors come from A·P = Q·R (the right basis P): still an
    orthogonal projection of A, so the reported error is the actual one."""
    a = spectrum_matrix(600, 400, power_law(400, 0.3))
    approx = randomized_svd(
        a, 16, SvdSettings(n_iter=None), generator=torch.Generator().manual_seed(0)
    )
    assert approx.iterations == 2.5
    actual = float((a - approx.up @ approx.down).double().norm() / a.double().norm())
    assert approx.rel_error() == pytest.approx(actual, rel=1e-5)
    assert torch.allclose(approx.up.T @ approx.up, torch.diag(approx.singular_values), atol=1e-4)


def test_adaptive_reports_its_actual_error_and_respects_the_cap():
    a = spectrum_matrix(300, 200, power_law(200, 0.3))
    capped = randomized_svd(a, 8, SvdSettings(n_iter=None, tol=1e-12, max_iter=5))
    assert capped.iterations == 5
    once = randomized_svd(a, 8, SvdSettings(n_iter=None, max_iter=1))
    assert once.iterations == 1
    actual = float((a - capped.up @ capped.down).double().norm() / a.double().norm())
    assert capped.rel_error() == pytest.approx(actual, rel=1e-4)


@pytest.mark.parametrize(
    ("sketch", "fewest", "most"), [("fp32", MIN_AUTO_ITER, MIN_AUTO_ITER), ("bf16", 2.5, 3.0)]
)
def test_adaptive_stops_near_the_minimum_on_an_exactly_low_rank_matrix(sketch, fewest, most):
    """fp32 stops at the minimum. With a bf16 sketch the first fp32 half-steps gain the ~1e-6
    of ‖A‖² the bf16 tilt missed, at the edge of fp32's noise (``NOISE``): half an iteration or
    one more, the same accuracy. Which of the two depends on the CPU's bf16 products: 3.0 with
    AVX512-BF16, 2.5 on an AVX2-only AMD EPYC."""
    a = spectrum_matrix(400, 300, torch.tensor([3.0, 2.0, 1.0, 0.5]))
    approx = randomized_svd(
        a, 8, SvdSettings(n_iter=None, sketch=sketch), generator=torch.Generator().manual_seed(0)
    )
    assert approx.iterations in {fewest, most}
    assert torch.allclose(approx.up @ approx.down, a, atol=1e-5)


def test_iteration_arguments_are_checked():
    a = torch.randn(60, 40)
    with pytest.raises(ValueError, match="tol must be > 0, got 0.0"):
        randomized_svd(a, 4, SvdSettings(n_iter=None, tol=0.0))
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        randomized_svd(a, 4, SvdSettings(n_iter=None, max_iter=0))
    with pytest.raises(ValueError, match="oversample and n_iter must be >= 0"):
        randomized_svd(a, 4, SvdSettings(n_iter=-1))
    with pytest.raises(ValueError, match="^sketch must be one of auto, bf16, fp32, got 'fp16'$"):
        SvdSettings(sketch="fp16")
    assert full_svd(a, 4).iterations == 0


@pytest.mark.gpu
def test_randomized_on_cuda_matches_cpu_accuracy():
    a = spectrum_matrix(700, 500, slowly_decaying(500))
    gpu = randomized_svd(a.cuda(), 16, generator=torch.Generator("cuda").manual_seed(0))
    assert gpu.up.device.type == "cuda"
    assert gpu.rel_error() <= 1.01 * full_svd(a, 16).rel_error()
