"""Tensors larger than ``--max-memory`` run in row blocks: extract's factors and merge's bytes
equal the whole-tensor path's (up to summation order for the SVD, exactly for merge), the
report says which ran blocked, and a rerun resumes them."""

import math
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.pipeline.extract.blocked import block_rows_for as extract_block_rows
from loraforge.pipeline.extract.blocked import device_block_rows as extract_device_rows
from loraforge.pipeline.extract.blocked import working_bytes as extract_working_bytes
from loraforge.pipeline.extract.command import extract
from loraforge.pipeline.extract.options import ExtractOptions, KernelOptions
from loraforge.pipeline.extract.plan import plan_extraction
from loraforge.pipeline.io.reader import index_checkpoint
from loraforge.pipeline.lora.config import LoraSpec, MergeConfig
from loraforge.pipeline.lora.inputs import open_lora
from loraforge.pipeline.merge.blocked import block_rows_for as merge_block_rows
from loraforge.pipeline.merge.blocked import device_block_rows as merge_device_rows
from loraforge.pipeline.merge.command import merge
from loraforge.pipeline.merge.options import MergeOptions
from loraforge.pipeline.merge.plan import plan_merge
from loraforge.pipeline.run.options import RunOptions

BUDGET = 64 * 2**20  # the smallest --max-memory: 4096×2048 does not fit it whole
ROWS, COLS = 4096, 2048


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocked")
    g = torch.Generator().manual_seed(0)
    base = {
        "big.weight": (torch.randn(ROWS, COLS, generator=g) * 0.02).bfloat16(),
        "small.weight": (torch.randn(256, 256, generator=g) * 0.02).bfloat16(),
        "small.bias": torch.zeros(256).bfloat16(),
    }
    delta = torch.randn(ROWS, 6, generator=g) @ torch.randn(6, COLS, generator=g) * 0.01
    tuned = {
        "big.weight": (base["big.weight"].float() + delta).bfloat16(),
        "small.weight": base["small.weight"] + 0.003,
        "small.bias": base["small.bias"] + 0.5,
    }
    save_file(base, root / "base.safetensors")
    save_file(tuned, root / "tuned.safetensors")
    return root


def _extract(pair, out, max_memory=None, rank=6, device="cpu"):
    options = ExtractOptions(
        kernel=KernelOptions(rank=rank), lowrank_min_params=10_000, output_dtype="fp32"
    )
    run = RunOptions(device=device, workers=2, max_memory=max_memory)
    return extract(
        source_model=str(pair / "base.safetensors"),
        target_model=str(pair / "tuned.safetensors"),
        output=str(out),
        options=options,
        run=run,
    )


def test_extract_blocked_gives_the_whole_paths_factors(pair, tmp_path):
    blocked = _extract(pair, tmp_path / "blocked.safetensors", BUDGET)
    whole = _extract(pair, tmp_path / "whole.safetensors")
    assert blocked["summary"]["memory"] == {"budget_bytes": BUDGET, "blocked": ["big.weight"]}
    assert whole["summary"]["memory"]["blocked"] == []
    entry = blocked["tensors"]["big.weight"]
    # passes: stats, A·Ω, two per power iteration (as many as the adaptive kernel took)
    assert re.fullmatch(
        r"ran blocked: 5 blocks of 974 rows, \d+ passes \(larger than the memory budget\)",
        entry["note"],
    )
    a, b = load_file(tmp_path / "blocked.safetensors"), load_file(tmp_path / "whole.safetensors")
    assert sorted(a) == sorted(b)
    stem = "diffusion_model.big"
    got = a[f"{stem}.lora_up.weight"] @ a[f"{stem}.lora_down.weight"]
    want = b[f"{stem}.lora_up.weight"] @ b[f"{stem}.lora_down.weight"]
    assert float((got - want).norm() / want.norm()) < 1e-5
    assert entry["kernel_rel_error"] == pytest.approx(
        whole["tensors"]["big.weight"]["kernel_rel_error"], rel=1e-3
    )
    for key in a:  # the small tensors ran whole both times: same bytes
        if not key.startswith(stem):
            assert torch.equal(a[key], b[key]), key


def test_a_blocked_extraction_resumes(pair, tmp_path):
    _extract(pair, tmp_path / "lora.safetensors", BUDGET)
    again = _extract(pair, tmp_path / "lora.safetensors", BUDGET, rank=4)
    assert again["summary"]["computed"] == 0
    assert again["tensors"]["big.weight"]["status"] == "sliced"


@pytest.mark.parametrize("output_dtype", ["bf16", "fp16"])
def test_merge_blocked_writes_the_same_bytes(pair, tmp_path, output_dtype):
    _extract(pair, tmp_path / "lora.safetensors")
    config = MergeConfig((LoraSpec(str(tmp_path / "lora.safetensors"), 0.7),))
    reports = {}
    for name, budget in (("blocked", BUDGET), ("whole", None)):
        reports[name] = merge(
            source_model=str(pair / "base.safetensors"),
            loras=config,
            output=str(tmp_path / f"{name}.safetensors"),
            options=MergeOptions(output_dtype=output_dtype),
            run=RunOptions(device="cpu", workers=2, max_memory=budget),
        )
    blocked, whole = (load_file(tmp_path / f"{n}.safetensors") for n in ("blocked", "whole"))
    assert sorted(blocked) == sorted(whole)
    for key in blocked:
        # The same fp32 sums, but a row block's addmm may round a few of them differently
        # (summation order inside the GEMM): at most one unit in the last place, rarely.
        steps = (blocked[key].view(torch.int16).int() - whole[key].view(torch.int16).int()).abs()
        assert int(steps.max()) <= 1, key
        assert int((steps > 0).sum()) <= blocked[key].numel() // 10_000, key
    rows = merge_block_rows_expected(output_dtype)
    assert reports["blocked"]["tensors"]["big.weight"]["note"] == (
        f"ran blocked: {math.ceil(ROWS / rows)} blocks of {rows} rows "
        "(larger than the memory budget)"
    )
    assert reports["blocked"]["summary"]["memory"]["blocked"] == ["big.weight"]


def merge_block_rows_expected(output_dtype: str) -> int:
    # fp32 merge buffer + the 2-byte output per element; (budget − 32 MiB slack) / 2 per block
    return (BUDGET - 32 * 2**20) // 2 // ((4 + 2) * COLS)


def test_block_sizes_from_headers(pair):
    base = index_checkpoint(str(pair / "base.safetensors"))
    tuned = index_checkpoint(str(pair / "tuned.safetensors"))
    options = ExtractOptions(kernel=KernelOptions(rank=16), lowrank_min_params=10_000)
    tasks = {t.key: t for t in plan_extraction(base, tuned, options).tasks}
    kernel = options.kernel
    # svd state 4·q·3·(m+n) + 4·3·q² with q = 32; (budget − it − 32 MiB) / 2 per block
    assert extract_block_rows(tasks["big.weight"], kernel, BUDGET) == 951
    assert extract_block_rows(tasks["big.weight"], kernel, 2**30) is None
    assert extract_block_rows(tasks["small.weight"], kernel, BUDGET) is None
    # whole: fp32 delta and base (8 bytes an element), a bf16 sketch's copy 2 more, the SVD state
    big = tasks["big.weight"]
    state = 4 * 32 * 3 * (ROWS + COLS) + 4 * 3 * 32 * 32 + 32 * 2**20
    fp32, bf16 = KernelOptions(rank=16, sketch="fp32"), KernelOptions(rank=16, sketch="bf16")
    assert extract_working_bytes(big, fp32) == 8 * ROWS * COLS + state
    assert extract_working_bytes(big, bf16) == 10 * ROWS * COLS + state
    need = 10 * ROWS * COLS + state  # fits whole only with its bf16 copy counted
    assert (
        extract_block_rows(big, bf16, need) is None and extract_block_rows(big, fp32, need) is None
    )
    assert extract_block_rows(big, bf16, need - 1) is not None
    plan = plan_merge(base, [], MergeOptions(output_dtype="fp16"))
    merged = {t.key: t for t in plan.tasks}
    assert merged["big.weight"].kind == "cast"  # no LoRA: 2 bytes an element fit
    assert merge_block_rows(merged["big.weight"], BUDGET) is None
    assert merge_block_rows(merged["big.weight"], 40 * 2**20) == 4 * 2**20 // (2 * COLS)


@pytest.mark.gpu
def test_blocked_on_cuda_matches_the_whole_path_on_cpu(pair, tmp_path):
    blocked = _extract(pair, tmp_path / "cuda.safetensors", BUDGET, device="cuda")
    _extract(pair, tmp_path / "cpu.safetensors")
    assert blocked["summary"]["memory"]["blocked"] == ["big.weight"]
    a, b = load_file(tmp_path / "cuda.safetensors"), load_file(tmp_path / "cpu.safetensors")
    stem = "diffusion_model.big"
    got = a[f"{stem}.lora_up.weight"] @ a[f"{stem}.lora_down.weight"]
    want = b[f"{stem}.lora_up.weight"] @ b[f"{stem}.lora_down.weight"]
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_a_blocked_diff_is_stored_chunk_by_chunk_and_exported_exactly(pair, tmp_path):
    reports = {}
    for name, budget in (("blocked", BUDGET), ("whole", None)):
        options = ExtractOptions(diff_only=True, output_dtype="fp32")
        reports[name] = extract(
            source_model=str(pair / "base.safetensors"),
            target_model=str(pair / "tuned.safetensors"),
            output=str(tmp_path / f"{name}.safetensors"),
            options=options,
            run=RunOptions(device="cpu", workers=2, max_memory=budget),
        )
    # fp32 delta + upcast base: 8 bytes an element, (64 − 32 MiB slack) / 2 per block
    rows = 16 * 2**20 // (8 * COLS)
    assert reports["blocked"]["tensors"]["big.weight"]["note"] == (
        f"ran blocked: {ROWS // rows} blocks of {rows} rows (larger than the memory budget)"
    )
    blocked, whole = (load_file(tmp_path / f"{n}.safetensors") for n in ("blocked", "whole"))
    assert blocked.keys() == whole.keys()
    assert all(torch.equal(blocked[k], whole[k]) for k in blocked)
    array = tmp_path / "blocked.safetensors.work" / "tensors" / "big.weight" / "diff"
    chunks = sorted(p.name for p in array.glob("c.*"))
    assert chunks == sorted(f"c.{i}.0" for i in range(ROWS // rows))  # one chunk per block


def test_an_unreadable_chunk_of_a_blocked_diff_is_recomputed(pair, tmp_path):
    def run():
        return extract(
            source_model=str(pair / "base.safetensors"),
            target_model=str(pair / "tuned.safetensors"),
            output=str(tmp_path / "diff.safetensors"),
            options=ExtractOptions(diff_only=True, output_dtype="bf16"),
            run=RunOptions(device="cpu", workers=2, max_memory=BUDGET),
        )

    run()
    first = (tmp_path / "diff.safetensors").read_bytes()
    chunk = tmp_path / "diff.safetensors.work" / "tensors" / "big.weight" / "diff" / "c.2.0"
    chunk.write_bytes(chunk.read_bytes()[:100])  # truncated: its crc32c cannot match
    again = run()
    entry = again["tensors"]["big.weight"]
    assert entry["status"] == "recomputed"
    assert "intermediate was unreadable (big.weight/diff: " in entry["note"]
    assert (tmp_path / "diff.safetensors").read_bytes() == first


def test_a_tensor_larger_than_the_gpus_free_memory_is_cut_into_blocks(pair, monkeypatch):
    """On a GPU the whole-tensor path is also refused by the device's free memory: 80% of it
    is the budget (no GPU needed to check the decision; the CUDA run is the gpu test above)."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**20, 2**36))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    base = index_checkpoint(str(pair / "base.safetensors"))
    tuned = index_checkpoint(str(pair / "tuned.safetensors"))
    options = ExtractOptions(kernel=KernelOptions(rank=16), lowrank_min_params=10_000)
    tasks = {t.key: t for t in plan_extraction(base, tuned, options).tasks}
    budget = int(80 * 2**20 * 0.8)
    assert extract_device_rows(tasks["big.weight"], options.kernel, cuda) == extract_block_rows(
        tasks["big.weight"], options.kernel, budget, "cuda:0"
    )
    assert extract_device_rows(tasks["small.weight"], options.kernel, cuda) is None
    lora = {
        "diffusion_model.big.lora_up.weight": torch.zeros(ROWS, 2),
        "diffusion_model.big.lora_down.weight": torch.zeros(2, COLS),
    }
    save_file(lora, pair / "zero_lora.safetensors")
    shapes = {key: info.shape for key, info in base.tensors.items()}
    spec = LoraSpec(str(pair / "zero_lora.safetensors"))
    plan = plan_merge(base, [open_lora(spec, shapes)], MergeOptions(output_dtype="fp16"))
    merged = {t.key: t for t in plan.tasks}
    assert merged["big.weight"].kind == "merged"
    rows = merge_device_rows(merged["big.weight"], cuda)
    assert (
        rows
        == merge_block_rows(merged["big.weight"], budget)
        == ((budget - 32 * 2**20) // 2 // ((4 + 2) * COLS))
    )
    assert merge_device_rows(merged["small.weight"], cuda) is None  # cast, not merged
