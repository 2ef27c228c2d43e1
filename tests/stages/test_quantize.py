"""The scaled-fp8 stage: dequantization is the loaders' formula, quantization saturates and
rounds to nearest."""

import pytest
import torch

from loraforge.stages.quantize import (
    dequantize,
    fp8_scale,
    quantize_fp8,
    scale_rows,
)

E4M3 = torch.float8_e4m3fn


def codes(*values: float) -> torch.Tensor:
    return torch.tensor(values).to(E4M3)


def test_dequantize_multiplies_by_one_scale_in_fp32():
    w8 = codes(1.0, -2.0, 448.0, 0.015625).reshape(2, 2)
    scale = torch.tensor(0.1)
    out = dequantize(w8, scale)
    assert out.dtype == torch.float32
    assert torch.equal(out, w8.float() * torch.tensor(0.1))
    assert out[1, 0].item() == pytest.approx(44.8, rel=1e-6)


@pytest.mark.parametrize("shape", [(3,), (3, 1)])
def test_dequantize_scales_each_row_by_its_own_value(shape):
    w8 = codes(*range(1, 7)).reshape(3, 2)
    scale = torch.tensor([1.0, 0.5, 0.25]).reshape(shape)
    expected = torch.tensor([[1.0, 2.0], [1.5, 2.0], [1.25, 1.5]])
    assert torch.equal(dequantize(w8, scale), expected)


def test_dequantize_upcasts_a_bf16_scale_and_reuses_the_buffer():
    w8 = codes(2.0, 4.0).reshape(1, 2)
    out = torch.empty(1, 2)
    result = dequantize(w8, torch.tensor([0.5], dtype=torch.bfloat16), out=out)
    assert result.data_ptr() == out.data_ptr()
    assert result.tolist() == [[1.0, 2.0]]


def test_dequantize_refuses_a_scale_that_fits_neither_layout():
    with pytest.raises(ValueError, match=r"scale of shape \[2\] fits neither"):
        dequantize(codes(1, 2, 3, 4, 5, 6).reshape(3, 2), torch.ones(2))


def test_scale_is_amax_over_fp8_max_per_tensor_or_row():
    w = torch.tensor([[1.0, -896.0], [0.0, 0.0]])
    assert fp8_scale(w, E4M3).item() == 2.0
    assert fp8_scale(w, E4M3).shape == ()
    rows = fp8_scale(w, E4M3, per_row=True)
    assert rows.shape == (2, 1)
    assert rows.tolist() == [[2.0], [1.0]]  # an all-zero row gets scale 1


def test_quantize_saturates_at_the_fp8_max():
    w = torch.tensor([1000.0, -1000.0, 448.0, 1.0])
    w8, scale = quantize_fp8(w, E4M3, torch.tensor(1.0))
    assert w8.float().tolist() == [448.0, -448.0, 448.0, 1.0]
    assert scale.item() == 1.0
    # e5m2 has infinities: there an unclamped cast overflows, the stage clamps first.
    big = torch.tensor([70000.0, -1e6])
    assert torch.isinf(big.to(torch.float8_e5m2).float()).all()
    w8, _ = quantize_fp8(big, torch.float8_e5m2, torch.tensor(1.0))
    assert w8.float().tolist() == [57344.0, -57344.0]


def test_quantize_rounds_to_nearest_even():
    # Between 1.0 and 1.125 (step 0.125): 1.0625 is a tie (to even: 1.0), 1.07 rounds up.
    w8, _ = quantize_fp8(torch.tensor([1.0625, 1.07, 1.1875]), E4M3, torch.tensor(1.0))
    assert w8.float().tolist() == [1.0, 1.125, 1.25]


def test_quantize_then_dequantize_reaches_the_amax_exactly():
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    w8, scale = quantize_fp8(w, E4M3)
    assert scale.item() == (w.abs().max() / 448.0).item()
    assert torch.equal(w8, (w / scale).clamp(-448, 448).to(E4M3))
    back = dequantize(w8, scale)
    assert (back - w).abs().max() <= w.abs().max() / 16  # 3 mantissa bits
    assert back.abs().max() == (w8.float().abs().max() * scale)


def test_quantize_refuses_a_non_fp8_dtype():
    with pytest.raises(ValueError, match="not an fp8 dtype"):
        quantize_fp8(torch.ones(2), torch.bfloat16)


def test_scale_rows_slices_per_row_scales_only():
    one = torch.tensor(3.0)
    assert scale_rows(one, 2, 4) is one
    assert scale_rows(torch.arange(6.0).reshape(6, 1), 2, 4).tolist() == [2.0, 3.0]
