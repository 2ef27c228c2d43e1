"""fp8 and scaled-fp8 checkpoints end to end: extract and merge equal the formula
``W = W_fp8 · scale`` exactly, and ``merge --output-dtype fp8_e4m3fn`` writes the base's own
convention, bit for bit what quantizing the formula gives."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraforge.pipeline.io.reader import index_checkpoint, load_weight
from loraforge.pipeline.lora.config import LoraSpec, MergeConfig
from loraforge.pipeline.merge.command import merge
from loraforge.pipeline.merge.options import MergeOptions
from loraforge.pipeline.run.options import RunOptions
from tests.helpers import fp8
from tests.helpers.checkpoints import pair_tensors, save_lora
from tests.helpers.cli import run_cli
from tests.helpers.reference import read_report

Q, FFN = "blocks.0.attn.q.weight", "blocks.0.ffn.0.weight"
CONVENTIONS = ["scaled_fp8", "comfy_quant", "lightx2v"]
PER_ROW = {"scaled_fp8": False, "comfy_quant": False, "lightx2v": True}


def base_file(tmp_path, convention, name="base.safetensors", seed=0):
    base, _ = pair_tensors(seed=seed, dtype=torch.float32)
    stored, metadata = fp8.scaled(base, [Q, FFN], convention, PER_ROW[convention])
    return fp8.save(stored, tmp_path / name, metadata), stored


def scale_key(key, convention):
    return key.removesuffix(".weight") + fp8.SCALE[convention]


def bytes_of(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


# ---- extract ----


def extract_diffs(source, target, output):
    result = run_cli(
        "extract",
        "--source-model",
        source,
        "--target-model",
        target,
        "--output",
        output,
        "--diff-only",
        "--output-dtype",
        "fp32",
        "--device",
        "cpu",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no "changed but not in the LoRA" for the scales
    return load_file(output), read_report(os.path.splitext(output)[0] + ".report.json")


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_extract_from_a_scaled_fp8_base_and_a_bf16_finetune(tmp_path, convention):
    source, stored = base_file(tmp_path, convention)
    _, tuned = pair_tensors(dtype=torch.bfloat16)
    target = fp8.save(tuned, tmp_path / "target.safetensors")
    lora, report = extract_diffs(source, target, str(tmp_path / "lora.safetensors"))
    for key in (Q, FFN):
        diff = lora[f"diffusion_model.{key.removesuffix('.weight')}.diff"]
        expected = tuned[key].float() - fp8.value(stored, key, convention)
        assert torch.equal(diff, expected), key
    for key in (Q, FFN):
        scale = scale_key(key, convention)
        assert report["tensors"][scale]["kind"] == "skipped"
        assert report["tensors"][scale]["note"] == f"fp8 scale of {key} (applied when reading it)"
    assert not any(
        k.endswith(("scale_weight", "weight_scale")) for k in report["summary"]["source_only"]
    )


def test_extract_from_two_scaled_fp8_checkpoints(tmp_path):
    source, base = base_file(tmp_path, "comfy_quant")
    target, tuned = base_file(tmp_path, "comfy_quant", "target.safetensors", seed=1)
    lora, report = extract_diffs(source, target, str(tmp_path / "lora.safetensors"))
    for key in (Q, FFN):
        diff = lora[f"diffusion_model.{key.removesuffix('.weight')}.diff"]
        expected = fp8.value(tuned, key, "comfy_quant") - fp8.value(base, key, "comfy_quant")
        assert torch.equal(diff, expected), key
    assert report["tensors"]["blocks.0.attn.q.weight_scale"]["kind"] == "skipped"


def test_extract_low_rank_from_a_scaled_base_sees_the_dequantized_delta(tmp_path):
    source, stored = base_file(tmp_path, "scaled_fp8")
    _, tuned = pair_tensors(dtype=torch.float32)
    target = fp8.save(tuned, tmp_path / "target.safetensors")
    out = str(tmp_path / "lora.safetensors")
    args = ["--source-model", source, "--target-model", target, "--output", out]
    result = run_cli("extract", *args, "--rank", "8", "--lowrank-min-params", 1000, "--quiet")
    assert result.exit_code == 0, result.output
    lora = load_file(out)
    up = lora["diffusion_model.blocks.0.attn.q.lora_up.weight"].float()
    down = lora["diffusion_model.blocks.0.attn.q.lora_down.weight"].float()
    delta = tuned[Q] - fp8.value(stored, Q, "scaled_fp8")
    # Against the raw fp8 codes the delta would be off by the scale (~1/16000 here).
    assert torch.linalg.norm(up @ down - delta) <= 0.01 * torch.linalg.norm(delta)


# ---- merge ----


def lora_file(tmp_path):
    """A LoRA on the q projection with alpha 8 at rank 4: factor 2, exact in fp32."""
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(96, 4, generator=g) * 0.01, torch.randn(4, 128, generator=g) * 0.01
    stem = "diffusion_model.blocks.0.attn.q"
    tensors = {
        f"{stem}.lora_up.weight": up,
        f"{stem}.lora_down.weight": down,
        f"{stem}.alpha": torch.tensor(8.0),
    }
    return save_lora(tmp_path, "lora.safetensors", tensors), up, down


def run_merge(base, lora, output, dtype):
    config = MergeConfig((LoraSpec(str(lora), 1.0),))
    return merge(
        source_model=str(base),
        loras=config,
        output=str(output),
        options=MergeOptions(output_dtype=dtype),
        run=RunOptions(device="cpu", workers=2),
    )


def formula(stored, convention, up, down):
    """The merged q weight: the dequantized base plus 2·up@down, in fp32."""
    expected = fp8.value(stored, Q, convention).clone()
    return expected.addmm_(up, down, alpha=2.0)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_merge_of_a_scaled_base_into_fp32_is_the_formula(tmp_path, convention):
    base, stored = base_file(tmp_path, convention)
    lora, up, down = lora_file(tmp_path)
    report = run_merge(base, lora, tmp_path / "out.safetensors", "fp32")
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out[Q], formula(stored, convention, up, down))
    assert torch.equal(out[FFN], fp8.value(stored, FFN, convention))  # unpatched: dequantized
    companions = {scale_key(Q, convention), scale_key(FFN, convention)}
    if convention == "scaled_fp8":
        companions.add("scaled_fp8")
    assert companions.isdisjoint(out)  # a scale left beside an fp32 weight would rescale it
    assert set(report["summary"]["dropped"]) == companions
    assert report["tensors"][FFN]["kind"] == "cast"


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_merge_into_fp8_keeps_the_base_convention(tmp_path, convention):
    base, stored = base_file(tmp_path, convention)
    lora, up, down = lora_file(tmp_path)
    output = tmp_path / "out.safetensors"
    run_merge(base, lora, output, "fp8_e4m3fn")
    out = load_file(output)
    w8, scale = fp8.quantize(formula(stored, convention, up, down), PER_ROW[convention])
    assert torch.equal(bytes_of(out[Q]), bytes_of(w8))
    q_scale = scale_key(Q, convention)
    assert out[q_scale].dtype == torch.float32
    assert torch.equal(out[q_scale], scale.reshape(stored[q_scale].shape))
    # The unpatched weight and its scale keep their bytes; everything else its dtype and bytes.
    for key in set(stored) - {Q, q_scale}:
        assert out[key].dtype == stored[key].dtype, key
        assert torch.equal(bytes_of(out[key]), bytes_of(stored[key])), key
    assert set(out) == set(stored)
    with safe_open(str(output), "pt") as f:
        metadata = f.metadata()
    assert ("_quantization_metadata" in metadata) == (convention == "comfy_quant")
    if convention == "comfy_quant":
        assert json.loads(metadata["_quantization_metadata"])["layers"] == {
            "blocks.0.attn.q": {"format": "float8_e4m3fn"},
            "blocks.0.ffn.0": {"format": "float8_e4m3fn"},
        }
    # Read back by loraforge (as a runtime would): the dequantized quantized formula.
    index = index_checkpoint(str(output))
    assert index.fp8.convention == convention
    assert torch.equal(load_weight(index.tensors[Q]), fp8.dequant(w8, scale))


def test_merge_of_a_bf16_base_into_fp8_writes_comfyui_scaled_fp8(tmp_path):
    base, _ = pair_tensors(dtype=torch.bfloat16)
    base["text_embedding.0.weight"] = torch.ones(16, 8, dtype=torch.bfloat16)
    path = fp8.save(base, tmp_path / "base.safetensors")
    lora, up, down = lora_file(tmp_path)
    output = tmp_path / "out.safetensors"
    report = run_merge(path, lora, output, "float8_e4m3fn")
    out = load_file(output)
    merged = base[Q].float().addmm_(up, down, alpha=2.0)
    for key, value in ((Q, merged), (FFN, base[FFN].float())):
        w8, scale = fp8.quantize(value)
        assert torch.equal(bytes_of(out[key]), bytes_of(w8)), key
        assert torch.equal(out[scale_key(key, "scaled_fp8")], scale), key
        assert out[scale_key(key, "scaled_fp8")].shape == ()
    assert out["scaled_fp8"].dtype == torch.float8_e4m3fn
    assert out["scaled_fp8"].shape == (0,)  # as ComfyUI saves it
    # Only the blocks' linear layers are quantized; heads, embeddings, norms, biases are kept.
    kept = set(base) - {Q, FFN}
    assert {k: out[k].dtype for k in kept} == {k: base[k].dtype for k in kept}
    assert set(out) == set(base) | {"scaled_fp8", *(scale_key(k, "scaled_fp8") for k in (Q, FFN))}
    assert report["tensors"]["blocks.0.attn.q.scale_weight"]["shape"] == []
    assert index_checkpoint(str(output)).fp8.convention == "scaled_fp8"


@pytest.mark.parametrize("convention", ["scaled_fp8", "comfy_quant"])
def test_an_e5m2_base_is_requantized_to_e4m3fn_and_labelled_so(tmp_path, convention):
    base, _ = pair_tensors(dtype=torch.float32)
    stored, metadata = fp8.scaled(base, [Q, FFN], convention)
    e5m2 = {}
    for key in (Q, FFN):  # stored as e5m2 with the same scales
        scale = stored[scale_key(key, convention)]
        e5m2[key] = (base[key] / scale).clamp(-57344, 57344).to(torch.float8_e5m2)
    stored.update(e5m2)
    if convention == "scaled_fp8":
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e5m2)
    else:
        metadata = {
            "_quantization_metadata": metadata["_quantization_metadata"].replace(
                "float8_e4m3fn", "float8_e5m2"
            )
        }
    path = fp8.save(stored, tmp_path / "base.safetensors", metadata)
    lora, up, down = lora_file(tmp_path)
    output = tmp_path / "out.safetensors"
    run_merge(path, lora, output, "fp8_e4m3fn")
    out = load_file(output)
    for key in (Q, FFN):  # unpatched too: e5m2 bytes cannot be kept in an e4m3fn file
        value = fp8.value(stored, key, convention)
        if key == Q:
            value = value.addmm_(up, down, alpha=2.0)
        w8, scale = fp8.quantize(value)
        assert torch.equal(bytes_of(out[key]), bytes_of(w8)), key
        assert torch.equal(out[scale_key(key, convention)], scale), key
    with safe_open(str(output), "pt") as f:
        header = f.metadata()
    if convention == "scaled_fp8":
        assert out["scaled_fp8"].dtype == torch.float8_e4m3fn
    else:
        layers = json.loads(header["_quantization_metadata"])["layers"]
        assert {conf["format"] for conf in layers.values()} == {"float8_e4m3fn"}


def test_merge_of_a_plain_fp8_base_into_fp8_gives_its_matrices_scales(tmp_path):
    base, _ = pair_tensors(dtype=torch.float32)
    stored = {k: v.to(torch.float8_e4m3fn) if k in (Q, FFN) else v for k, v in base.items()}
    path = fp8.save(stored, tmp_path / "base.safetensors")
    lora, up, down = lora_file(tmp_path)
    output = tmp_path / "out.safetensors"
    run_merge(path, lora, output, "fp8_e4m3fn")
    out = load_file(output)
    w8, scale = fp8.quantize(stored[Q].float().addmm_(up, down, alpha=2.0))
    assert torch.equal(bytes_of(out[Q]), bytes_of(w8))
    assert torch.equal(out["blocks.0.attn.q.scale_weight"], scale)
    # The unpatched fp8 weight keeps its bytes, so its scale is 1.
    assert torch.equal(bytes_of(out[FFN]), bytes_of(stored[FFN]))
    assert out["blocks.0.ffn.0.scale_weight"].tolist() == 1.0
    assert out["scaled_fp8"].shape == (0,)
    assert torch.equal(load_weight(index_checkpoint(str(output)).tensors[FFN]), stored[FFN].float())


def test_merge_cli_takes_fp8_output_and_extract_refuses_it(tmp_path):
    base, stored = base_file(tmp_path, "scaled_fp8")
    lora, up, down = lora_file(tmp_path)
    output = str(tmp_path / "out.safetensors")
    args = ["--source-model", base, "--lora-model", lora, "--output", output, "--device", "cpu"]
    result = run_cli("merge", *args, "--output-dtype", "fp8_e4m3fn", "--quiet")
    assert result.exit_code == 0, result.output
    w8, _ = fp8.quantize(formula(stored, "scaled_fp8", up, down))
    assert torch.equal(bytes_of(load_file(output)[Q]), bytes_of(w8))

    args = ["--source-model", base, "--target-model", base, "--output", str(tmp_path / "x")]
    result = run_cli("extract", *args, "--output-dtype", "fp8_e4m3fn")
    assert result.exit_code == 2
    assert result.stderr.startswith(
        "error: unknown dtype 'fp8_e4m3fn' (fp8 output: merge only); valid: float32, fp32,"
    )


# ---- on a GPU ----


@pytest.mark.gpu
def test_scaled_fp8_on_cuda(tmp_path):
    """Diffs are elementwise, so cuda gives the CPU's bytes; a merged fp8 weight and its scale,
    computed by two cuda tasks, agree with each other."""
    source, stored = base_file(tmp_path, "scaled_fp8")
    _, tuned = pair_tensors(dtype=torch.bfloat16)
    target = fp8.save(tuned, tmp_path / "target.safetensors")
    out = str(tmp_path / "lora.safetensors")
    args = ["--source-model", source, "--target-model", target, "--output", out, "--diff-only"]
    result = run_cli("extract", *args, "--output-dtype", "fp32", "--device", "cuda", "--quiet")
    assert result.exit_code == 0, result.output
    diff = load_file(out)["diffusion_model.blocks.0.attn.q.diff"]
    assert torch.equal(diff, tuned[Q].float() - fp8.value(stored, Q, "scaled_fp8"))

    lora, up, down = lora_file(tmp_path)
    output = str(tmp_path / "merged.safetensors")
    args = ["--source-model", source, "--lora-model", lora, "--output", output]
    result = run_cli("merge", *args, "--output-dtype", "fp8_e4m3fn", "--device", "cuda")
    assert result.exit_code == 0, result.output
    merged = load_file(output)
    on_gpu = fp8.value(stored, Q, "scaled_fp8").cuda().addmm_(up.cuda(), down.cuda(), alpha=2.0)
    w8, scale = fp8.quantize(on_gpu.cpu())
    assert torch.equal(merged["blocks.0.attn.q.scale_weight"], scale)
    assert torch.equal(bytes_of(merged[Q]), bytes_of(w8))


def test_a_target_sharing_only_scale_bookkeeping_shares_nothing(tmp_path):
    source, _ = base_file(tmp_path, "scaled_fp8")
    other, _ = fp8.scaled({"other.0.weight": torch.ones(4, 4)}, ["other.0.weight"], "scaled_fp8")
    target = fp8.save(other, tmp_path / "other.safetensors")
    args = ["--source-model", source, "--target-model", target, "--output", tmp_path / "x"]
    result = run_cli("extract", *args, "--device", "cpu")
    assert result.exit_code == 1
    assert "shares no tensor name with the base" in result.stderr


def test_a_scaled_fp8_task_over_the_memory_budget_runs_whole_and_says_so(tmp_path):
    big = "blocks.1.ffn.0.weight"  # 4096 x 2048: 9 bytes an element whole, over 64 MiB
    base, _ = pair_tensors(dtype=torch.bfloat16)
    base[big] = torch.randn(4096, 2048, generator=torch.Generator().manual_seed(3)).bfloat16()
    path = fp8.save(base, tmp_path / "base.safetensors")
    lora, _, _ = lora_file(tmp_path)
    report = merge(
        source_model=path,
        loras=MergeConfig((LoraSpec(str(lora), 1.0),)),
        output=str(tmp_path / "out.safetensors"),
        options=MergeOptions(output_dtype="fp8_e4m3fn"),
        run=RunOptions(device="cpu", workers=1, max_memory=64 * 2**20),
    )
    notes = {k: e["note"] for k, e in report["tensors"].items() if "note" in e}
    whole = "ran whole over the memory budget (fp8 output needs the whole tensor for its scale)"
    assert notes == {big: whole, "blocks.1.ffn.0.scale_weight": whole}
    w8, _ = fp8.quantize(base[big])
    assert torch.equal(bytes_of(load_file(tmp_path / "out.safetensors")[big]), bytes_of(w8))


@pytest.mark.parametrize(
    ("convention", "per_row"), [("scaled_fp8", False), ("comfy_quant", False), ("lightx2v", True)]
)
def test_a_scaled_base_over_the_budget_merges_into_bf16_in_row_blocks(
    tmp_path, convention, per_row
):
    """Dequantized a block of rows at a time (the scale's rows, for per-row scales): the same
    values as the whole path, up to the GEMM's summation order (one bf16 step, rarely)."""
    big = "blocks.1.ffn.0.weight"  # 4096 x 2048: 6 bytes an element whole, over 64 MiB
    base, _ = pair_tensors(dtype=torch.bfloat16)
    base[big] = torch.randn(4096, 2048, generator=torch.Generator().manual_seed(3)).bfloat16()
    stored, metadata = fp8.scaled(base, [big], convention, per_row=per_row)
    path = fp8.save(stored, tmp_path / "base.safetensors", metadata)
    lora = {
        "diffusion_model.blocks.1.ffn.0.lora_up.weight": torch.randn(4096, 4) * 0.1,
        "diffusion_model.blocks.1.ffn.0.lora_down.weight": torch.randn(4, 2048) * 0.1,
    }
    save_file(lora, tmp_path / "lora.safetensors")
    merged = {}
    for name, budget in (("blocked", 64 * 2**20), ("whole", None)):
        report = merge(
            source_model=path,
            loras=MergeConfig((LoraSpec(str(tmp_path / "lora.safetensors"), 1.0),)),
            output=str(tmp_path / f"{name}.safetensors"),
            options=MergeOptions(output_dtype="bf16"),
            run=RunOptions(device="cpu", workers=1, max_memory=budget),
        )
        merged[name] = load_file(tmp_path / f"{name}.safetensors")
        blocked = report["summary"]["memory"]["blocked"]
        assert blocked == ([big] if name == "blocked" else []), name
    assert merged["blocked"].keys() == merged["whole"].keys()
    got, whole = (merged[n][big].view(torch.int16).int() for n in ("blocked", "whole"))
    steps = (got - whole).abs()
    assert int(steps.max()) <= 1 and int((steps > 0).sum()) <= steps.numel() // 10_000
    want = (
        fp8.value(stored, big, convention)
        + lora["diffusion_model.blocks.1.ffn.0.lora_up.weight"]
        @ lora["diffusion_model.blocks.1.ffn.0.lora_down.weight"]
    )
    assert torch.allclose(merged["blocked"][big].float(), want, rtol=2**-7, atol=1e-6)
