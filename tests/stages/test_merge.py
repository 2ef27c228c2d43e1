"""The merge stage: W + Σ factor·(up @ down) + factor·diff in one fp32 buffer."""

import pytest
import torch

from loraforge.stages.merge import Delta, as_fp32, merge_weight


def test_merge_weight_is_exact():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 3, 2, 2, generator=g).bfloat16()
    up, down = torch.randn(6, 2, 1, 1, generator=g), torch.randn(2, 3, 2, 2, generator=g)
    diff = torch.randn(6, 3, 2, 2, generator=g).half()
    consumed = []

    def deltas():
        consumed.append("lowrank")
        yield Delta(0.5, up=up, down=down)
        consumed.append("diff")
        yield Delta(-2.0, diff=diff)

    generator = deltas()
    out = torch.empty(6, 3, 2, 2)
    merged = merge_weight(base, generator, out=out)
    assert merged.data_ptr() == out.data_ptr() and merged.dtype == torch.float32
    expected = (
        base.double()
        + 0.5 * (up.double().reshape(6, 2) @ down.double().reshape(2, 12)).reshape(6, 3, 2, 2)
        - 2.0 * diff.double()
    )
    assert float((merged.double() - expected).abs().max()) < 1e-5
    assert consumed == ["lowrank", "diff"]
    assert torch.equal(merge_weight(base, []), base.float())
    with pytest.raises(ValueError, match="2\\+ dims"):
        merge_weight(torch.zeros(4), [Delta(1.0, up=torch.zeros(4, 1), down=torch.zeros(1, 1))])


def test_as_fp32_converts_the_factors_once_to_the_same_values():
    up = torch.randn(6, 3, 1, 1, dtype=torch.bfloat16)  # a conv LoRA's factors
    down = torch.randn(3, 4, 3, 3, dtype=torch.bfloat16)
    delta = as_fp32(Delta(0.5, up=up, down=down))
    assert delta.factor == 0.5 and delta.diff is None
    assert delta.up.dtype == delta.down.dtype == torch.float32
    assert delta.up.shape == (6, 3) and delta.down.shape == (3, 36)
    assert torch.equal(delta.up, up.float().reshape(6, 3))
    assert torch.equal(delta.down, down.float().reshape(3, 36))
    base = torch.randn(6, 4, 3, 3, dtype=torch.bfloat16)
    merged = merge_weight(base, [Delta(0.5, up=up, down=down)])
    assert torch.equal(merge_weight(base, [delta]), merged)
    diff = Delta(2.0, diff=torch.ones(3))
    assert as_fp32(diff) is diff
