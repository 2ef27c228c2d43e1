"""The diff and cast stages."""

import math

import pytest
import torch

from loraforge.stages.cast import cast, needs_cast
from loraforge.stages.diff import is_unchanged, max_abs, weight_delta


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
    assert max_abs(torch.tensor([1.0, 2.0])) == 2.0
    assert math.isnan(max_abs(torch.tensor([1.0, float("nan")])))
    assert math.isnan(max_abs(torch.tensor([float("nan"), -5.0])))
    assert max_abs(torch.tensor([1.0, float("-inf")])) == float("inf")
    assert max_abs(torch.empty(0)) == 0.0
    assert is_unchanged(1e-9) and not is_unchanged(1e-7)
    assert not is_unchanged(float("nan"))


def test_cast_leaves_non_float_tensors_alone():
    assert cast(torch.ones(3), torch.bfloat16).dtype == torch.bfloat16
    ints = torch.arange(3)
    assert cast(ints, torch.bfloat16).dtype == torch.int64
    assert cast(torch.ones(4, 4).T, torch.float32).is_contiguous()


def test_needs_cast():
    assert needs_cast(torch.ones(2), torch.bfloat16)
    assert needs_cast(torch.ones(2, dtype=torch.float16), torch.float32)
    assert not needs_cast(torch.ones(2), torch.float32)
    assert not needs_cast(torch.arange(2), torch.bfloat16)
    assert not needs_cast(torch.zeros(2, dtype=torch.bool), torch.float16)


def test_cast_into_a_buffer_gives_the_bytes_of_to():
    g = torch.Generator().manual_seed(0)
    tensor = torch.randn(7, 5, generator=g) * 1e3
    buffer = torch.empty(7, 5, dtype=torch.bfloat16)
    result = cast(tensor, torch.bfloat16, out=buffer)
    assert result.data_ptr() == buffer.data_ptr() and result.dtype == torch.bfloat16
    expected = tensor.to(torch.bfloat16)
    assert torch.equal(result.view(torch.int16), expected.view(torch.int16))
    assert torch.equal(buffer.view(torch.int16), expected.view(torch.int16))


def test_cast_ignores_the_buffer_when_nothing_converts():
    buffer = torch.zeros(3, dtype=torch.float32)
    same = torch.tensor([1.0, 2.0, 3.0])
    result = cast(same, torch.float32, out=buffer)
    assert result.data_ptr() == same.data_ptr()
    assert torch.equal(buffer, torch.zeros(3))
    ints = torch.arange(3)
    assert cast(ints, torch.float32, out=buffer).data_ptr() == ints.data_ptr()
    assert torch.equal(buffer, torch.zeros(3))
