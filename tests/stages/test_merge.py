"""The merge stage: W + Σ factor·(up @ down) + factor·diff in one fp32 buffer."""

import pytest
import torch

from loraforge.stages.merge import Delta, merge_weight, with_fp32_down


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


def test_with_fp32_down_converts_down_once_to_the_same_values():
    up = torch.randn(6, 3, 1, 1, dtype=torch.bfloat16)  # a conv LoRA's factors
    down = torch.randn(3, 4, 3, 3, dtype=torch.bfloat16)
    delta = with_fp32_down(Delta(0.5, up=up, down=down))
    assert delta.factor == 0.5 and delta.diff is None
    assert delta.up is up  # converted a block of rows at a time by merge_weight
    assert delta.down.dtype == torch.float32 and delta.down.shape == (3, 36)
    assert torch.equal(delta.down, down.float().reshape(3, 36))
    base = torch.randn(6, 4, 3, 3, dtype=torch.bfloat16)
    merged = merge_weight(base, [Delta(0.5, up=up, down=down)])
    assert torch.equal(merge_weight(base, [delta]), merged)
    diff = Delta(2.0, diff=torch.ones(3))
    assert with_fp32_down(diff) is diff
