"""verify's numbers against a dense fp64 computation of the same definitions, read a block of
rows at a time (blocks made small here so every tensor spans several)."""

import math

import pytest
import torch
from safetensors.torch import save_file

from loraforge.pipeline.lora.config import LoraSpec, MergeConfig
from loraforge.pipeline.run.options import RunOptions
from loraforge.pipeline.verify import task as verify_task
from loraforge.pipeline.verify.command import verify
from loraforge.pipeline.verify.options import VerifyOptions
from tests.helpers import fp8
from tests.helpers.checkpoints import rand, save_lora

Q = "blocks.0.attn.q"


@pytest.fixture
def files(tmp_path):
    base = {
        f"{Q}.weight": rand(48, 32, seed=1),
        f"{Q}.bias": rand(48, seed=2),
        "blocks.0.ffn.0.weight": rand(64, 32, seed=3).bfloat16(),
        "blocks.0.norm.weight": torch.ones(32),
        "head.weight": rand(8, 32, seed=4),
    }
    target = {k: v.clone() for k, v in base.items()}
    target[f"{Q}.weight"] += 0.1 * rand(48, 4, seed=5) @ rand(4, 32, seed=6)
    target[f"{Q}.bias"] += 0.01 * rand(48, seed=7)
    target["blocks.0.ffn.0.weight"] += (0.1 * rand(64, 32, seed=8)).bfloat16()
    lora_a = {
        f"diffusion_model.{Q}.lora_up.weight": rand(48, 4, seed=5),
        f"diffusion_model.{Q}.lora_down.weight": rand(4, 32, seed=6),
        f"diffusion_model.{Q}.alpha": torch.tensor(2.0),  # scale 0.5
        "diffusion_model.head.diff": 0.01 * rand(8, 32, seed=9),  # F equals B there
    }
    lora_b = {
        f"diffusion_model.{Q}.diff_b": 0.01 * rand(48, seed=7),
        "diffusion_model.blocks.0.ffn.0.lora_up.weight": rand(64, 2, seed=10),
        "diffusion_model.blocks.0.ffn.0.lora_down.weight": rand(2, 32, seed=11),
    }
    paths = str(tmp_path / "base.safetensors"), str(tmp_path / "target.safetensors")
    save_file(base, paths[0])
    save_file(target, paths[1])
    a = save_lora(tmp_path, "a.safetensors", lora_a)
    b = save_lora(tmp_path, "b.safetensors", lora_b)
    return paths, (a, lora_a), (b, lora_b), base, target


def dense(base, target, lora_a, lora_b, sa, sb, alpha):
    """error² and change² per key, the whole tensors at once in fp64."""
    delta = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in base.items()}
    qa = f"diffusion_model.{Q}"
    delta[f"{Q}.weight"] += (
        sa
        * 0.5
        * lora_a[f"{qa}.lora_up.weight"].double()
        @ lora_a[f"{qa}.lora_down.weight"].double()
    )
    delta["head.weight"] += sa * lora_a["diffusion_model.head.diff"].double()
    delta[f"{Q}.bias"] += sb * lora_b[f"{qa}.diff_b"].double()
    f = "diffusion_model.blocks.0.ffn.0"
    delta["blocks.0.ffn.0.weight"] += (
        sb * lora_b[f"{f}.lora_up.weight"].double() @ lora_b[f"{f}.lora_down.weight"].double()
    )
    sums = {}
    for key in base:
        b, t = base[key].double(), target[key].double()
        sums[key] = (
            float(((b + alpha * delta[key] - t) ** 2).sum()),
            float(((t - b) ** 2).sum()),
        )
    return sums


@pytest.mark.parametrize("block", [1 << 20, 40])
def test_numbers_equal_a_dense_fp64_computation(files, tmp_path, monkeypatch, block):
    monkeypatch.setattr(verify_task, "BLOCK_ELEMENTS", block)  # 40: one row per block
    paths, (a, lora_a), (b, lora_b), base, target = files
    report = verify(
        source_model=paths[0],
        target_model=paths[1],
        loras=MergeConfig((LoraSpec(a, 0.8), LoraSpec(b, -0.3))),
        options=VerifyOptions(alpha=1.5, max_error=0.5, worst=3),
        run=RunOptions(device="cpu", workers=2, report=str(tmp_path / "v.json")),
    )
    sums = dense(base, target, lora_a, lora_b, 0.8, -0.3, 1.5)
    for key, (error_sq, change_sq) in sums.items():
        entry = report["tensors"][key]
        assert entry["error_norm"] == pytest.approx(math.sqrt(error_sq), rel=1e-12, abs=1e-300)
        assert entry["change_norm"] == pytest.approx(math.sqrt(change_sq), rel=1e-12, abs=1e-300)
        if change_sq:
            assert entry["rel_error"] == pytest.approx(math.sqrt(error_sq / change_sq), rel=1e-12)
    assert report["tensors"]["blocks.0.norm.weight"]["rel_error"] == 0.0  # 0 / 0
    head = report["tensors"]["head.weight"]
    assert head["rel_error"] is None and head["note"] == "F equals B here, but B + LoRA does not"
    total = math.sqrt(sum(e for e, _ in sums.values()) / sum(c for _, c in sums.values()))
    summary = report["summary"]
    assert summary["rel_error"] == pytest.approx(total, rel=1e-12)
    assert summary["passed"] is (total <= 0.5)
    assert [w["key"] for w in summary["worst"]][0] == "head.weight"  # nan ranks first
    assert len(summary["worst"]) == 3
    assert summary["report"] == str(tmp_path / "v.json")
    assert (tmp_path / "v.json").exists()


def test_exact_lora_verifies_to_rounding(files, tmp_path):
    paths, (a, _lora_a), _b, _base, _target = files
    report = verify(
        source_model=paths[0],
        target_model=paths[1],
        loras=MergeConfig((LoraSpec(a, 0.2),)),  # 0.2 · scale 0.5 · up@down: exactly Q's change
        options=VerifyOptions(),
        run=RunOptions(device="cpu", workers=1),
    )
    assert report["tensors"][f"{Q}.weight"]["rel_error"] < 1e-6
    assert report["tensors"][f"{Q}.bias"]["rel_error"] == 1.0  # not in this LoRA
    assert report["summary"]["passed"] is None and "report" not in report["summary"]


@pytest.mark.parametrize(
    ("convention", "per_row"), [("scaled_fp8", False), ("comfy_quant", False), ("lightx2v", True)]
)
def test_scaled_fp8_sides_are_compared_by_their_value(
    files, tmp_path, monkeypatch, convention, per_row
):
    """A scaled-fp8 B and F count as W_fp8 · scale (as merge writes and loaders read them),
    per row block when the scale is per row; their scales and markers are no tensors compared."""
    monkeypatch.setattr(verify_task, "BLOCK_ELEMENTS", 40)  # per-row scales sliced per block
    _paths, (a, lora_a), (b, lora_b), base, target = files
    keys = (f"{Q}.weight", "head.weight")
    base8, meta_b = fp8.scaled(base, keys, convention, per_row)
    target8, meta_t = fp8.scaled(target, keys, convention, per_row)
    paths = (
        fp8.save(base8, tmp_path / "base8.safetensors", meta_b),
        fp8.save(target8, tmp_path / "target8.safetensors", meta_t),
    )
    report = verify(
        source_model=paths[0],
        target_model=paths[1],
        loras=MergeConfig((LoraSpec(a, 0.8), LoraSpec(b, -0.3))),
        options=VerifyOptions(),
        run=RunOptions(device="cpu", workers=1),
    )
    values = {k: fp8.value(base8, k, convention) for k in base}
    targets = {k: fp8.value(target8, k, convention) for k in target}
    sums = dense(values, targets, lora_a, lora_b, 0.8, -0.3, 1.0)
    assert sorted(k for k, e in report["tensors"].items() if e["kind"] != "skipped") == sorted(base)
    for key, (error_sq, change_sq) in sums.items():
        entry = report["tensors"][key]
        assert entry["error_norm"] == pytest.approx(math.sqrt(error_sq), rel=1e-12, abs=1e-300)
        assert entry["change_norm"] == pytest.approx(math.sqrt(change_sq), rel=1e-12, abs=1e-300)
    assert report["summary"]["source_only"] == report["summary"]["target_only"] == []


def test_an_empty_tensor_compares_as_nothing(files, tmp_path):
    _paths, (a, _lora_a), _b, base, target = files
    paths = str(tmp_path / "b0.safetensors"), str(tmp_path / "t0.safetensors")
    save_file({**base, "empty": torch.empty(0, 3)}, paths[0])
    save_file({**target, "empty": torch.empty(0, 3)}, paths[1])
    report = verify(
        source_model=paths[0],
        target_model=paths[1],
        loras=MergeConfig((LoraSpec(a, 0.2),)),
        options=VerifyOptions(),
        run=RunOptions(device="cpu", workers=1),
    )
    empty = report["tensors"]["empty"]
    assert (empty["rel_error"], empty["error_norm"], empty["change_norm"]) == (0.0, 0.0, 0.0)


def test_patched_tensors_that_cannot_be_compared_are_warned_about(files, tmp_path):
    """A LoRA patching a tensor the target lacks (or has at another shape) would otherwise
    pass --max-error without its change being checked at all."""
    _paths, (a, _lora_a), (b, _lora_b), base, target = files
    target = {k: v for k, v in target.items() if k != f"{Q}.weight"}
    target["blocks.0.ffn.0.weight"] = target["blocks.0.ffn.0.weight"][:, :16].contiguous()
    paths = str(tmp_path / "base1.safetensors"), str(tmp_path / "target1.safetensors")
    save_file(base, paths[0])
    save_file(target, paths[1])
    report = verify(
        source_model=paths[0],
        target_model=paths[1],
        loras=MergeConfig((LoraSpec(a, 0.2), LoraSpec(b, 1.0))),
        options=VerifyOptions(max_error=1.0),
        run=RunOptions(device="cpu", workers=1),
    )
    summary = report["summary"]
    assert summary["uncompared"] == {
        "blocks.0.ffn.0.weight": "shape mismatch: [64, 32] vs [64, 16]",
        f"{Q}.weight": "not in the target model",
    }
    assert summary["warnings"] == [
        "2 tensors the LoRAs patch are not compared (not in the total), e.g. "
        f"'{Q}.weight': not in the target model"
    ]
    assert summary["passed"] is True
