"""``inspect`` on LoRAs of every naming: exact counts, histograms and sizes, norms equal to the
dense fp64 computation, the report's exact keys; with a base, the exact lists."""

import math
import os

import pytest
import torch
from safetensors.torch import save_file

from loraforge.pipeline.inspect.command import inspect_lora
from tests.helpers.checkpoints import make_base, save_lora
from tests.helpers.namings import MODULES, STYLES, factors, module_name, write_styled_lora

REPORT_KEYS = [
    "path", "file", "format", "adapter_config", "naming", "namings", "tensors", "bytes", "dtypes",
    "lowrank", "diffs", "ranks", "alphas", "scales", "nonfinite", "unmatched", "warnings",
    "modules", "base", "clients",
]  # fmt: skip
MODULE_KEYS = [
    "module", "leaf", "kind", "naming", "shape", "rank", "alpha", "scale", "dtypes", "bytes",
    "norm",
]  # fmt: skip


# Low-rank norms come from fp32 Gram matrices (pipeline/inspect/task.py): off by about
# u·√k ≈ 5e-7 at these sizes (k ≤ 64 terms a dot product, u = 2⁻²⁴), and redone in fp64 where
# cancellation pushes the estimate past 1e-4, measured errors being 10 to 40 times below it.
GRAM_REL = 1e-5


def dense_norm(up, down, scale) -> float:
    """The reference: the product formed, in fp64."""
    return float(torch.linalg.matrix_norm(scale * (up.double() @ down.double())))


@pytest.mark.parametrize("style", STYLES)
def test_every_naming(tmp_path, style):
    path = write_styled_lora(str(tmp_path), style)
    before = sorted(os.listdir(tmp_path))
    report = inspect_lora(path)
    assert sorted(os.listdir(tmp_path)) == before  # read-only
    assert list(report) == REPORT_KEYS
    assert report["naming"] == style
    assert report["namings"] == {style: 3}
    with_alpha = style != "peft"
    assert report["tensors"] == 9 if with_alpha else 6
    factor_bytes = 2 * sum((out + inp) * rank for out, inp, rank, _ in MODULES.values())
    assert report["bytes"] == factor_bytes + (3 * 4 if with_alpha else 0)
    assert report["dtypes"] == ({"BF16": 6, "F32": 3} if with_alpha else {"BF16": 6})
    assert (report["lowrank"], report["diffs"]) == (3, 0)
    assert report["ranks"] == {"4": 2, "8": 1}
    assert report["alphas"] == {"2": 1, "8": 2}  # PEFT's from its adapter_config.json
    assert report["scales"] == {"0.5": 1, "1": 1, "2": 1}
    assert (report["unmatched"], report["warnings"], report["base"]) == ({}, [], None)
    assert report["clients"] is None  # not a Wan LoRA: no loader rules judge it
    assert report["adapter_config"] == (
        os.path.join(path, "adapter_config.json") if style == "peft" else None
    )
    ups = factors()
    rows = {row["module"]: row for row in report["modules"]}
    assert sorted(rows) == sorted(module_name(style, m) for m in MODULES)
    for module, (out, inp, rank, alpha) in MODULES.items():
        row = rows[module_name(style, module)]
        assert list(row) == MODULE_KEYS
        assert (row["kind"], row["leaf"], row["shape"], row["rank"]) == (
            "lowrank", "weight", [out, inp], rank,
        )  # fmt: skip
        assert row["alpha"] == alpha
        assert row["scale"] == alpha / rank
        assert row["dtypes"] == (["BF16", "F32"] if with_alpha else ["BF16"])
        assert row["bytes"] == 2 * (out + inp) * rank + (4 if with_alpha else 0)
        expected = dense_norm(*ups[module], alpha / rank)
        assert math.isclose(row["norm"], expected, rel_tol=GRAM_REL), (row["norm"], expected)


def test_diffs_conv_factors_and_keys_left_over(tmp_path):
    diff, bias = torch.randn(6, 5, dtype=torch.float64), torch.randn(6)
    up, down = torch.randn(16, 3), torch.randn(3, 4, 1, 2, 2)
    tensors = {
        "diffusion_model.x.diff": diff,
        "diffusion_model.x.diff_b": bias,
        "diffusion_model.patch.lora_up.weight": up.reshape(16, 3, 1, 1, 1),
        "diffusion_model.patch.lora_down.weight": down,
        "diffusion_model.lonely.lora_up.weight": torch.ones(2, 1),
        "extra.weight": torch.ones(1),
    }
    report = inspect_lora(save_lora(str(tmp_path), "l.safetensors", tensors))
    assert report["naming"] == "lightx2v"
    assert (report["lowrank"], report["diffs"]) == (1, 2)
    assert report["unmatched"] == {
        "diffusion_model.lonely.lora_up.weight": "up without down",
        "extra.weight": "not a LoRA key name",
    }
    rows = {(r["module"], r["leaf"]): r for r in report["modules"]}
    assert list(rows) == [
        ("diffusion_model.patch", "weight"),
        ("diffusion_model.x", "bias"),
        ("diffusion_model.x", "weight"),
    ]
    patch = rows[("diffusion_model.patch", "weight")]
    assert (patch["shape"], patch["rank"], patch["scale"]) == ([16, 4, 1, 2, 2], 3, 1.0)
    expected = dense_norm(up, down.reshape(3, -1), 1.0)
    assert math.isclose(patch["norm"], expected, rel_tol=GRAM_REL)
    assert math.isclose(
        rows[("diffusion_model.x", "weight")]["norm"], float(diff.norm()), rel_tol=1e-15
    )
    x_bias = rows[("diffusion_model.x", "bias")]
    assert (x_bias["kind"], x_bias["rank"], x_bias["dtypes"]) == ("diff", None, ["F32"])
    assert math.isclose(x_bias["norm"], float(bias.double().norm()), rel_tol=1e-15)


@pytest.mark.parametrize("magnitude", [1e20, 1e-25])
def test_factors_beyond_fp32_squares(tmp_path, magnitude):
    """Squares of these overflow (1e40) or underflow (1e-50) fp32: the factors are scaled by a
    power of two first."""
    up, down = torch.randn(64, 4) * magnitude, torch.randn(4, 48) * magnitude
    tensors = {"m.lora_up.weight": up, "m.lora_down.weight": down}
    report = inspect_lora(save_lora(str(tmp_path), "l.safetensors", tensors))
    assert math.isclose(report["modules"][0]["norm"], dense_norm(up, down, 1.0), rel_tol=GRAM_REL)


def test_cancelling_components_are_redone_in_fp64(tmp_path):
    """up·down = 1e-3·A·C from components that cancel: from fp32 Gram matrices the norm would be
    off by about 1e-7·√64 / 1e-6 (~50%); the fp64 redo leaves 1e-16 / 1e-6."""
    a, b, c = torch.randn(64, 8), torch.randn(8, 48), torch.randn(8, 48)
    up, down = torch.cat([a, a], 1), torch.cat([b, 1e-3 * c - b], 0)
    tensors = {"m.lora_up.weight": up, "m.lora_down.weight": down}
    report = inspect_lora(save_lora(str(tmp_path), "l.safetensors", tensors))
    assert math.isclose(report["modules"][0]["norm"], dense_norm(up, down, 1.0), rel_tol=1e-9)


def test_nonfinite_tensors_are_named_not_refused(tmp_path):
    up = torch.ones(4, 2)
    up[0, 0] = float("nan")
    tensors = {"m.lora_up.weight": up, "m.lora_down.weight": torch.ones(2, 4)}
    report = inspect_lora(save_lora(str(tmp_path), "l.safetensors", tensors))
    assert report["nonfinite"] == ["m"]
    assert report["modules"][0]["norm"] is None


def test_with_a_base_lists_targets_orphans_and_mismatches(tmp_path):
    base, _ = make_base(str(tmp_path))
    path = write_styled_lora(str(tmp_path), "kohya")
    report = inspect_lora(path, base=base)
    assert report["base"] == {
        "path": base,
        "tensors": 8,
        "targeted": [
            "blocks.0.attn.k.weight",
            "blocks.0.attn.q.weight",
            "blocks.0.ffn.0.weight",
        ],
        "untargeted": {},
        "shape_mismatches": {},
    }
    tensors = {
        "diffusion_model.blocks.0.attn.q.lora_up.weight": torch.ones(48, 2),
        "diffusion_model.blocks.0.attn.q.lora_down.weight": torch.ones(2, 32),
        "diffusion_model.blocks.0.attn.k.lora_up.weight": torch.ones(40, 2),
        "diffusion_model.blocks.0.attn.k.lora_down.weight": torch.ones(2, 32),
        "diffusion_model.blocks.0.attn.k.alpha": torch.tensor(2.0),
        "diffusion_model.blocks.9.gone.diff": torch.ones(3),
        "diffusion_model.blocks.0.norm.diff": torch.ones(31),
        "junk": torch.ones(1),
    }
    report = inspect_lora(save_lora(str(tmp_path), "l.safetensors", tensors), base=base)
    mismatch = "shape mismatch: up@down is 40x32 but base is 48x32"
    assert report["base"]["targeted"] == ["blocks.0.attn.q.weight"]
    assert report["base"]["untargeted"] == {
        "diffusion_model.blocks.0.attn.k.alpha": "alpha of an unmatched up/down pair",
        "diffusion_model.blocks.9.gone.diff": "targets no base tensor",
    }
    assert report["base"]["shape_mismatches"] == {
        "diffusion_model.blocks.0.attn.k.lora_down.weight": mismatch,
        "diffusion_model.blocks.0.attn.k.lora_up.weight": mismatch,
        "diffusion_model.blocks.0.norm.diff": "shape mismatch: diff is 31 but base is 32",
    }
    assert report["unmatched"] == {"junk": "not a LoRA key name"}  # listed once, not per base


def test_mixed_namings(tmp_path):
    tensors = {
        "lora_unet_a.lora_up.weight": torch.ones(2, 1),
        "lora_unet_a.lora_down.weight": torch.ones(1, 2),
        "transformer.b.lora_B.weight": torch.ones(2, 1),
        "transformer.b.lora_A.weight": torch.ones(1, 2),
        "transformer.c.lora_B.weight": torch.ones(2, 1),
        "transformer.c.lora_A.weight": torch.ones(1, 2),
    }
    save_file(tensors, str(tmp_path / "l.safetensors"))
    report = inspect_lora(str(tmp_path / "l.safetensors"))
    assert (report["naming"], report["namings"]) == ("mixed", {"diffusers": 2, "kohya": 1})
