"""The table of --svd methods: names, one calling convention, validation and the CLI's help."""

import pytest
import torch

from loraforge.kernels import SVD_METHODS, LowRank, SvdMethod, SvdSettings
from loraforge.pipeline.errors import UsageError
from loraforge.pipeline.extract.options import ExtractOptions, KernelOptions
from loraforge.stages.lowrank import lowrank
from tests.helpers.cli import run_cli


def low_rank_matrix(m=60, n=40, rank=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)


def test_method_names_in_order():
    assert list(SVD_METHODS) == ["randomized", "full"]
    for name, method in SVD_METHODS.items():
        assert isinstance(method, SvdMethod) and method.name == name
        assert method.help.strip() != ""


@pytest.mark.parametrize("name", ["randomized", "full"])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_each_factor_returns_the_rank_asked_for(name, rank):
    delta = low_rank_matrix()
    result = SVD_METHODS[name].factor(
        delta, rank, seed=7, settings=SvdSettings(oversample=4, n_iter=1)
    )
    assert isinstance(result, LowRank)
    assert result.rank == rank
    assert result.up.shape == (60, rank) and result.down.shape == (rank, 40)
    assert result.up.dtype == torch.float32 and result.down.dtype == torch.float32


@pytest.mark.parametrize("name", ["randomized", "full"])
def test_each_factor_recovers_an_exact_low_rank_delta(name):
    delta = low_rank_matrix()
    result = SVD_METHODS[name].factor(
        delta, 5, seed=0, settings=SvdSettings(oversample=4, n_iter=1)
    )
    assert float((result.up @ result.down - delta).abs().max()) <= 1e-4 * float(delta.abs().max())
    assert result.rel_error() < 1e-4


@pytest.mark.parametrize("name", ["randomized", "full"])
def test_each_factor_caps_the_rank_at_the_smaller_dimension(name):
    result = SVD_METHODS[name].factor(
        low_rank_matrix(12, 6), 32, seed=0, settings=SvdSettings(oversample=4, n_iter=1)
    )
    assert result.rank == 6 and result.up.shape == (12, 6) and result.down.shape == (6, 6)


def test_randomized_factor_is_seeded_and_full_ignores_the_seed():
    delta = torch.randn(80, 50, generator=torch.Generator().manual_seed(3))
    randomized = SVD_METHODS["randomized"].factor
    settings = SvdSettings(oversample=2, n_iter=0)
    a = randomized(delta, 4, seed=1, settings=settings)
    b = randomized(delta, 4, seed=1, settings=settings)
    c = randomized(delta, 4, seed=2, settings=settings)
    assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
    assert not torch.equal(a.up, c.up)
    full = SVD_METHODS["full"].factor
    d = full(delta, 4, seed=1, settings=settings)
    e = full(delta, 4, seed=99, settings=SvdSettings(oversample=30, n_iter=7))
    assert torch.equal(d.up, e.up) and torch.equal(d.down, e.down)


@pytest.mark.parametrize("name", ["randomized", "full"])
def test_kernel_options_accept_every_method(name):
    assert KernelOptions(method=name).method == name
    assert ExtractOptions(kernel={"method": name}).kernel.method == name


@pytest.mark.parametrize("name", ["qr", "Randomized", ""])
def test_kernel_options_refuse_an_unknown_method(name):
    with pytest.raises(UsageError) as info:
        KernelOptions(method=name)
    assert str(info.value) == f"unknown --svd {name!r}; valid: randomized, full"
    assert info.value.exit_code == 2


def test_the_lowrank_stage_refuses_an_unknown_method():
    with pytest.raises(ValueError) as info:
        lowrank(torch.zeros(4, 4), 2, name="x", method="qr")
    assert str(info.value) == "unknown SVD method 'qr'; valid: randomized, full"


def test_cli_svd_help_lists_every_method():
    result = run_cli("extract", "--help")
    assert result.exit_code == 0
    assert "<randomized|full>" in result.output
    for method in SVD_METHODS.values():
        assert f"{method.name}: {method.help}" in result.output


def test_cli_refuses_an_unknown_svd_method(tmp_path):
    args = ["--source-model", tmp_path / "s.safetensors", "--target-model", tmp_path / "t"]
    result = run_cli("extract", *args, "--output", tmp_path / "o.safetensors", "--svd", "qr")
    assert result.exit_code == 2
    assert "Invalid value for '--svd'" in result.output
    assert "'qr' is not one of 'randomized', 'full'" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["randomized", "full"])
def test_each_factor_takes_the_adaptive_arguments(name):
    delta = torch.randn(80, 50, generator=torch.Generator().manual_seed(4))
    result = SVD_METHODS[name].factor(
        delta, 4, seed=0, settings=SvdSettings(oversample=4, n_iter=None, tol=1e-12, max_iter=3)
    )
    assert result.iterations == (3 if name == "randomized" else 0)


def test_the_lowrank_stage_iterates_adaptively_by_default():
    delta = torch.randn(80, 50, generator=torch.Generator().manual_seed(4))
    assert (
        lowrank(
            delta, 4, name="x", settings=SvdSettings(oversample=4, tol=1e-12, max_iter=3)
        ).iterations
        == 3
    )
    assert lowrank(delta, 4, name="x", settings=SvdSettings(oversample=4, n_iter=1)).iterations == 1


def test_kernel_options_default_to_adaptive_iterations_and_check_them():
    kernel = KernelOptions()
    assert (kernel.n_iter, kernel.tol, kernel.max_iter, kernel.sketch) == (None, 0.003, 4, "auto")
    assert KernelOptions.from_dict(kernel.to_dict()) == kernel
    assert KernelOptions.from_dict({**kernel.to_dict(), "sketch": "fp32"}).sketch == "fp32"
    with pytest.raises(UsageError) as info:
        KernelOptions(sketch="fp16")
    assert str(info.value) == "--sketch-precision must be one of auto, bf16, fp32, got 'fp16'"
    with pytest.raises(UsageError) as info:
        KernelOptions(tol=0.0)
    assert str(info.value) == "--svd-tol must be > 0, got 0.0"
    with pytest.raises(UsageError) as info:
        KernelOptions(max_iter=0)
    assert str(info.value) == "--max-power-iterations must be >= 1, got 0"
    with pytest.raises(UsageError) as info:
        KernelOptions(n_iter=-1)
    assert str(info.value) == "--oversample and --power-iterations must be >= 0"
