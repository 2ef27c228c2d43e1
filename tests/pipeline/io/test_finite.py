"""The finite check every write goes through: exact for every dtype and position, and its
message names the tensor, what made it, the dtype's range and the fix."""

import math

import pytest
import torch

from loraforge.pipeline.errors import NonFiniteOutput, NonFiniteTensor
from loraforge.pipeline.io.finite import check_written, is_finite, output_fix

CASES = [
    (dtype, bad)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    for bad in (math.nan, math.inf, -math.inf)
] + [(torch.float8_e4m3fn, math.nan)]  # e4m3fn has no Inf: torch saturates it to ±448


@pytest.mark.parametrize("dtype, bad", CASES)
def test_one_bad_value_anywhere_is_found(dtype, bad):
    for position in (0, 777, 64 * 33 - 1):
        tensor = torch.randn(64, 33).to(dtype)
        assert is_finite(tensor)
        tensor.view(-1)[position] = bad
        assert not is_finite(tensor)
        assert not is_finite(tensor.t())  # strided views too


def test_empty_and_integer_tensors_are_finite():
    assert is_finite(torch.empty(0, 5))
    assert is_finite(torch.arange(5))


def test_the_message():
    with pytest.raises(NonFiniteOutput) as info:
        check_written(
            torch.tensor([1.0, math.inf]).half(),
            key="w",
            made_from="a.safetensors at strength 9 × scale 1",
            fix=output_fix(torch.float16, "lower --strength"),
        )
    assert isinstance(info.value, NonFiniteTensor) and isinstance(info.value, ValueError)
    assert str(info.value) == (
        "tensor 'w': would be written holding NaN or Inf as fp16 (largest finite value ±65504); "
        "made from a.safetensors at strength 9 × scale 1 (lower --strength, or pass "
        "--output-dtype bf16 or fp32, which reach ±3.4e+38)"
    )
    assert output_fix(torch.bfloat16, "lower --strength") == "lower --strength"
    assert output_fix(torch.float32, None) == "check the inputs for values that large"
