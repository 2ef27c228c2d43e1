"""Stage: scaled fp8, ``W = W_fp8 · scale`` with one scale per tensor or one per output row.

The formula is the one the loaders apply: ComfyUI ``comfy/quant_ops.py``
``TensorCoreFP8Layout.dequantize`` (``qdata.to(dtype) * scale``; ``quantize``: scale = amax /
fp8 max, float32) and the older ``comfy/ops.py`` ``scaled_fp8_ops`` ``convert_weight``
(``weight * scale_weight``); LightX2V ``tools/convert/quant/quant.py``
``QuantWeightFP8.load_fp8_weight`` (scale = amax / 448 per tensor in ComfyUI mode, per row
``[out, 1]`` otherwise; values clipped to ±448 before rounding to nearest). Here the product is
taken in fp32, so a weight's value does not depend on the dtype a runtime computes in."""

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _broadcast(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``scale`` (one value, or one per row: ``[rows]`` or ``[rows, 1]``) shaped to multiply a
    tensor of ``shape``."""
    scale = scale.to(torch.float32)
    if scale.numel() == 1:
        return scale.reshape(())
    if len(shape) and scale.numel() == shape[0]:
        return scale.reshape(shape[0], *([1] * (len(shape) - 1)))
    raise ValueError(f"scale of shape {list(scale.shape)} fits neither one value nor one per row")


def scale_rows(scale: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The part of ``scale`` that applies to rows ``start:stop`` of its weight."""
    return scale if scale.numel() == 1 else scale.reshape(-1)[start:stop]


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``weight`` (fp8, or any float) as fp32 times ``scale``: exact upcast, one fp32 rounding
    per entry. ``out`` (fp32, same shape) lets the caller reuse a buffer."""
    if out is None:
        out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    return out.copy_(weight).mul_(_broadcast(scale.to(out.device), weight.shape))


def fp8_scale(weight: torch.Tensor, dtype: torch.dtype, per_row: bool = False) -> torch.Tensor:
    """fp32 scale ``amax / fp8 max`` over the tensor (shape ``[]``) or per row (``[rows, 1]``).
    An all-zero tensor or row gets scale 1, so dividing by it stays finite."""
    top = torch.finfo(dtype).max
    if per_row:
        amax = weight.reshape(weight.shape[0], -1).abs().amax(dim=1, keepdim=True)
    else:
        amax = weight.abs().amax()
    scale = amax.to(torch.float32) / top
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def quantize_fp8(
    weight: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w8, scale)``: ``weight / scale`` clamped to ±fp8 max, then rounded to the nearest fp8
    (ties to even). Clamping first makes the cast saturating whatever torch does past the max:
    an e5m2 cast overflows to inf, and older torch turns e4m3fn values past 448 into NaN (2.13
    saturates them). ``scale`` defaults to the per-tensor ``fp8_scale``."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"{dtype} is not an fp8 dtype")
    if scale is None:
        scale = fp8_scale(weight, dtype)
    top = torch.finfo(dtype).max
    scaled = weight.to(torch.float32) / _broadcast(scale, weight.shape)
    return scaled.clamp_(-top, top).to(dtype), scale
