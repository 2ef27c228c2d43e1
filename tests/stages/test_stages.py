"""The diff and cast stages, and the stage table."""

import pytest
import torch

from loraforge.stages import STAGES, cast, get_stage, is_unchanged, max_abs, register, weight_delta


def test_delta_is_exact_with_and_without_scratch():
    g = torch.Generator().manual_seed(0)
    base, target = (torch.randn(40, 30, generator=g).bfloat16() for _ in range(2))
    expected = target.double() - base.double()
    plain = weight_delta(base, target)
    out, scratch = torch.empty(40, 30), torch.empty(40, 30)
    reused = weight_delta(base, target, out=out, scratch=scratch)
    assert reused.data_ptr() == out.data_ptr() and reused.dtype == torch.float32
    assert torch.equal(plain, reused)
    assert torch.equal(plain.double(), expected)  # bf16 differences are exact in fp32
    with pytest.raises(ValueError, match="shapes differ"):
        weight_delta(torch.zeros(2, 3), torch.zeros(3, 2))


def test_max_abs_and_unchanged():
    assert max_abs(torch.tensor([-3.0, 2.0])) == 3.0
    assert max_abs(torch.tensor([1.0, float("nan")])) != max_abs(torch.tensor([1.0, 2.0]))
    assert max_abs(torch.tensor([1.0, float("-inf")])) == float("inf")
    assert max_abs(torch.empty(0)) == 0.0
    assert is_unchanged(1e-9) and not is_unchanged(1e-7)
    assert not is_unchanged(float("nan"))


def test_cast_leaves_non_float_tensors_alone():
    assert cast(torch.ones(3), torch.bfloat16).dtype == torch.bfloat16
    ints = torch.arange(3)
    assert cast(ints, torch.bfloat16).dtype == torch.int64
    assert cast(torch.ones(4, 4).T, torch.float32).is_contiguous()


def test_stage_table_names_valid_stages_and_refuses_duplicates():
    assert {"diff", "lowrank", "cast", "merge"} <= set(STAGES)
    assert get_stage("diff") is weight_delta
    with pytest.raises(KeyError, match="valid: cast, diff"):
        get_stage("dif")
    with pytest.raises(ValueError, match="already registered"):
        register("diff", weight_delta)
