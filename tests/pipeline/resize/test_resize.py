"""resize: the output of one or several LoRAs against the exact Σ strength·scale·up·down in
dense fp64, its reported errors, names without a base (the LoRAs' own) and with one (kohya),
resume and re-export."""

import math
import os

import pytest
import torch
from safetensors.torch import load_file

from loraforge.kernels import RankRule
from loraforge.pipeline.errors import LoraMismatch, NonFiniteTensor
from loraforge.pipeline.lora.config import LoraSpec, MergeConfig
from loraforge.pipeline.lora.styles import key_style
from loraforge.pipeline.resize.command import resize
from loraforge.pipeline.resize.options import ResizeOptions
from loraforge.pipeline.run.options import RunOptions
from tests.helpers.checkpoints import make_base, rand, save_lora

Q, FFN = "blocks.0.attn.q", "blocks.0.ffn.0"


@pytest.fixture
def loras(tmp_path):
    """A in LightX2V naming (alpha 2 on rank 4: scale 0.5), B in PEFT naming (scale 1)."""
    a = {
        f"diffusion_model.{Q}.lora_up.weight": rand(48, 4, seed=1),
        f"diffusion_model.{Q}.lora_down.weight": rand(4, 32, seed=2),
        f"diffusion_model.{Q}.alpha": torch.tensor(2.0),
        f"diffusion_model.{Q}.diff_b": rand(48, seed=3),
        f"diffusion_model.{FFN}.lora_up.weight": rand(64, 3, seed=4),
        f"diffusion_model.{FFN}.lora_down.weight": rand(3, 32, seed=5),
    }
    b = {
        f"base_model.model.{Q}.lora_B.weight": rand(48, 5, seed=6),
        f"base_model.model.{Q}.lora_A.weight": rand(5, 32, seed=7),
        f"base_model.model.{Q}.diff_b": rand(48, seed=8),
    }
    return save_lora(tmp_path, "a.safetensors", a), save_lora(tmp_path, "b.safetensors", b), a, b


def exact_sums(a: dict, b: dict, sa: float, sb: float) -> dict[str, torch.Tensor]:
    """The exact sums in fp64, by target weight."""

    def product(lora, up, down, scale):
        return scale * lora[up].double() @ lora[down].double()

    q = sa * product(
        a, f"diffusion_model.{Q}.lora_up.weight", f"diffusion_model.{Q}.lora_down.weight", 0.5
    ) + sb * product(
        b, f"base_model.model.{Q}.lora_B.weight", f"base_model.model.{Q}.lora_A.weight", 1.0
    )
    ffn = sa * product(
        a, f"diffusion_model.{FFN}.lora_up.weight", f"diffusion_model.{FFN}.lora_down.weight", 1
    )
    bias = sa * a[f"diffusion_model.{Q}.diff_b"].double()
    bias = bias + sb * b[f"base_model.model.{Q}.diff_b"].double()
    return {f"{Q}.weight": q, f"{FFN}.weight": ffn, f"{Q}.bias": bias}


def run(tmp_path, specs, rule, name="out.safetensors", base=None, **options):
    return resize(
        loras=MergeConfig(tuple(LoraSpec(p, s) for p, s in specs)),
        output=str(tmp_path / name),
        options=ResizeOptions(rank_rule=rule, output_dtype="fp32", **options),
        base=base,
        run=RunOptions(device="cpu", workers=1, work_dir=str(tmp_path / "work")),
    )


def stored_product(lora: dict, module: str) -> torch.Tensor:
    stem = f"diffusion_model.{module}"
    up, down = lora[f"{stem}.lora_up.weight"].double(), lora[f"{stem}.lora_down.weight"].double()
    alpha = float(lora[f"{stem}.alpha"]) if f"{stem}.alpha" in lora else up.shape[1]
    return alpha / up.shape[1] * up @ down


@pytest.mark.parametrize("rank", [16, 3])
def test_two_loras_equal_the_exact_sum_within_the_reported_error(tmp_path, loras, rank):
    path_a, path_b, a, b = loras
    report = run(tmp_path, [(path_a, 0.8), (path_b, -0.5)], RankRule(rank=rank))
    exact = exact_sums(a, b, 0.8, -0.5)
    out = load_file(tmp_path / "out.safetensors")
    assert sorted(out) == sorted(
        [
            f"diffusion_model.{m}.{s}"
            for m in (Q, FFN)
            for s in ("lora_up.weight", "lora_down.weight")  # alpha = rank: no key
        ]
        + [f"diffusion_model.{Q}.diff_b"]
    )
    for module in (Q, FFN):
        entry = report["tensors"][f"{module}.weight"]
        want = exact[f"{module}.weight"]
        assert entry["full_rank"] == (9 if module == Q else 3)
        assert entry["rank"] == min(rank, entry["full_rank"])
        actual = float((stored_product(out, module) - want).norm() / want.norm())
        # an upper bound to the accuracy of its fp32 singular values (the dropped energy)
        assert actual <= entry["rel_error"] * (1 + 1e-7)
        # The truncation error is the optimal one: that of the exact sum's own SVD.
        s = torch.linalg.svdvals(want)
        optimal = math.sqrt(float((s[entry["rank"] :] ** 2).sum()) / float((s**2).sum()))
        assert entry["kernel_rel_error"] == pytest.approx(optimal, rel=1e-6, abs=1e-7)
        assert entry["loras"] == ([path_a, path_b] if module == Q else [path_a])
    bias = out[f"diffusion_model.{Q}.diff_b"].double()
    assert torch.equal(bias, exact[f"{Q}.bias"].float().double())
    assert report["tensors"][f"{Q}.bias"]["kind"] == "diff"
    if rank == 16:  # every component kept: only fp32 rounding is left
        assert report["tensors"][f"{Q}.weight"]["rel_error"] < 1e-6


def test_resizing_a_lora_to_its_own_rank_reproduces_it(tmp_path, loras):
    path_a, _path_b, a, _b = loras
    report = run(tmp_path, [(path_a, 1.0)], RankRule(rank=4))
    out = load_file(tmp_path / "out.safetensors")
    # alpha = rank everywhere, so no alpha key (A's alpha 2 on rank 4 is folded into the factors)
    assert sorted(out) == sorted(k for k in a if not k.endswith(".alpha"))
    assert [report["tensors"][f"{m}.weight"]["rank"] for m in (Q, FFN)] == [4, 3]
    for module, scale in ((Q, 0.5), (FFN, 1.0)):
        stem = f"diffusion_model.{module}"
        want = scale * a[f"{stem}.lora_up.weight"].double() @ a[f"{stem}.lora_down.weight"].double()
        assert float((stored_product(out, module) - want).norm() / want.norm()) < 1e-6
    assert torch.equal(out[f"diffusion_model.{Q}.diff_b"], a[f"diffusion_model.{Q}.diff_b"])


def test_resume_and_rank_mode_changes_recompute_nothing(tmp_path, loras):
    path_a, path_b, _a, _b = loras
    specs = [(path_a, 0.8), (path_b, -0.5)]
    assert run(tmp_path, specs, RankRule(rank=16))["summary"]["computed"] == 3
    again = run(tmp_path, specs, RankRule(rank=16))
    assert (again["summary"]["computed"], again["summary"]["reused"]) == (0, 3)
    energy = run(tmp_path, specs, RankRule(mode="energy", rank=16, energy=0.5))
    assert energy["summary"]["computed"] == 0
    assert energy["tensors"][f"{Q}.weight"]["rank"] < 9
    assert energy["tensors"][f"{Q}.weight"]["kept_energy"] >= 0.5
    changed = run(tmp_path, [(path_a, 0.8), (path_b, 0.5)], RankRule(rank=16))
    assert changed["summary"]["computed"] == 2  # the targets B patches; FFN is A's alone
    assert changed["tensors"][f"{Q}.weight"]["note"] == "recomputed: strengths or scales changed"


def test_kohya_names_are_mapped_through_a_base(tmp_path):
    base, _tensors = make_base(tmp_path)
    kohya = {
        "lora_unet_blocks_0_attn_q.lora_up.weight": rand(48, 2, seed=1),
        "lora_unet_blocks_0_attn_q.lora_down.weight": rand(2, 32, seed=2),
        "lora_unet_blocks_0_attn_q.alpha": torch.tensor(2.0),
    }
    path = save_lora(tmp_path, "kohya.safetensors", kohya)
    report = run(tmp_path, [(path, 1.0)], RankRule(rank=8), base=base)
    assert list(report["tensors"]) == [f"{Q}.weight"]
    out = load_file(tmp_path / "out.safetensors")
    assert out[f"diffusion_model.{Q}.lora_up.weight"].shape == (48, 2)


def test_nothing_the_output_style_can_hold_is_refused_before_any_file(tmp_path):
    path = save_lora(tmp_path, "diff.safetensors", {f"{Q}.diff_b": rand(48, seed=1)})
    with pytest.raises(LoraMismatch) as info:
        run(tmp_path, [(path, 1.0)], RankRule(rank=4), name="out", key_style="peft")
    assert str(info.value) == (
        f"{path}: nothing to write in the peft style, e.g. '{Q}.diff_b': targets {Q}.bias: "
        f"{key_style('peft').cannot_hold(f'{Q}.bias')}"
    )
    assert sorted(os.listdir(tmp_path)) == ["diff.safetensors"]


def test_a_nonfinite_low_rank_sum_is_refused_naming_the_tensor(tmp_path, loras):
    """--allow-nonfinite reads a NaN factor, but a sum holding NaN has no SVD: one error naming
    the LoRA tensor instead of LAPACK's. A diff keeps its NaN (what the flag is for)."""
    _path_a, _path_b, a, _b = loras
    up = f"diffusion_model.{Q}.lora_up.weight"
    a = {**a, up: a[up].clone()}
    a[up][0, 0] = float("nan")
    path = save_lora(tmp_path, "nan.safetensors", a)
    with pytest.raises(NonFiniteTensor) as info:
        run(tmp_path, [(path, 1.0)], RankRule(rank=4), allow_nonfinite=True)
    assert str(info.value) == (
        f"{path}: tensor '{up}': holds NaN or Inf (a low-rank sum that is not finite cannot be "
        "refactored; fix the LoRA: --allow-nonfinite keeps NaN or Inf only in full diffs)"
    )


@pytest.mark.parametrize(
    "key_style, file, names",
    [
        ("lightx2v", "out.safetensors", ("lora_up.weight", "lora_down.weight")),
        ("peft", "out/adapter_model.safetensors", ("lora_B.weight", "lora_A.weight")),
    ],
)
def test_conv_factors_keep_their_dims(tmp_path, key_style, file, names):
    """A conv LoRA (up out×r×1×1, down r×in×kh×kw) resizes to factors of the same form, whose
    product is the original's (PEFT writes conv LoRAs this way too)."""
    up, down = rand(16, 4, 1, 1, seed=1), rand(4, 8, 3, 3, seed=2)
    lora = {"conv.lora_up.weight": up, "conv.lora_down.weight": down}
    path = save_lora(tmp_path, "conv.safetensors", lora)
    run(tmp_path, [(path, 1.0)], RankRule(rank=4), name="out", key_style=key_style)
    out = load_file(tmp_path / file)
    (new_up,) = [v for k, v in out.items() if k.endswith(names[0])]
    (new_down,) = [v for k, v in out.items() if k.endswith(names[1])]
    assert (new_up.shape, new_down.shape) == ((16, 4, 1, 1), (4, 8, 3, 3))
    product = new_up.flatten(1).double() @ new_down.flatten(1).double()
    exact = up.flatten(1).double() @ down.flatten(1).double()
    assert torch.allclose(product, exact, rtol=0, atol=1e-5)
