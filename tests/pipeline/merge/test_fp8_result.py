"""What a scaled-fp8 task computes is checked finite in fp32 and, cast, in its output dtype: an
fp16 output the dequantized value overflows is refused naming fp16; NaN the base held is carried
in every output dtype."""

import pytest
import torch

from loraforge.pipeline.errors import NonFiniteOutput
from loraforge.pipeline.io.reader import index_checkpoint
from loraforge.pipeline.merge.checks import Carried
from loraforge.pipeline.merge.fp8 import fp8_result
from loraforge.pipeline.merge.plan import MergeTask
from tests.helpers import fp8

Q = "blocks.0.attn.q.weight"


def scaled_base(tmp_path, first: float, scale: float):
    """A scaled-fp8 base holding ``Q`` as fp8 [[first, 1], [2, 3]] times ``scale``."""
    w8 = torch.tensor([[first, 1.0], [2.0, 3.0]]).to(torch.float8_e4m3fn)
    stored = {
        Q: w8,
        Q.removesuffix(".weight") + ".scale_weight": torch.tensor(scale),
        "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
    }
    path = fp8.save(stored, tmp_path / "base.safetensors")
    return path, index_checkpoint(path).tensors[Q]


def test_a_value_that_overflows_fp16_is_refused_naming_fp16(tmp_path):
    path, info = scaled_base(tmp_path, 448.0, 1024.0)
    with pytest.raises(NonFiniteOutput) as caught:
        fp8_result(MergeTask(Q, "cast", info, "F16"), "cpu", carried=Carried())
    assert str(caught.value) == (
        f"tensor '{Q}': would be written holding NaN or Inf as fp16 (largest finite value "
        f"±65504); made from {path}, cast from F8_E4M3 (pass --output-dtype bf16 or fp32, which "
        "reach ±3.4e+38)"
    )


def test_the_same_value_fits_bf16(tmp_path):
    _path, info = scaled_base(tmp_path, 448.0, 1024.0)
    result = fp8_result(MergeTask(Q, "cast", info, "BF16"), "cpu", carried=Carried())
    assert result.tolist() == [[458752.0, 1024.0], [2048.0, 3072.0]]


@pytest.mark.parametrize(("code", "part"), [("F16", "value"), ("F32", "scale")])
def test_nan_the_base_held_is_carried(tmp_path, code, part):
    _path, info = scaled_base(tmp_path, float("nan"), 2.0)
    carried = Carried()
    task = MergeTask(
        Q, "cast", info, code, (), part, part == "scale", () if part == "scale" else None
    )
    result = fp8_result(task, "cpu", carried=carried)
    assert carried.why == "the base held it"
    assert torch.isnan(result).any()


def test_allow_nonfinite_writes_the_fp16_overflow(tmp_path):
    _path, info = scaled_base(tmp_path, 448.0, 1024.0)
    carried = Carried()
    result = fp8_result(MergeTask(Q, "cast", info, "F16"), "cpu", True, carried)
    assert carried.why == "--allow-nonfinite"
    assert result.tolist() == [[float("inf"), 1024.0], [2048.0, 3072.0]]
