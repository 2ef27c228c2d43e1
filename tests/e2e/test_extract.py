"""End-to-end extraction through the CLI on tiny generated checkpoints."""

import json
import os
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.checkpoints import MIN_PARAMS, pair_tensors, save_sharded
from tests.helpers.cli import run_cli
from tests.helpers.reference import apply_reference, load_output, read_report, rel_error

PATCH_NOTE = "5-D tensor stored as a full diff (LightX2V's extractor fails here)"
PATCH_NUMEL = 64 * 4 * 2 * 2 * 20  # patch_embedding.weight of pair_tensors()


def extract(source, target, output, *extra):
    result = run_cli(
        "extract",
        "--source-model",
        source,
        "--target-model",
        target,
        "--output",
        output,
        "--lowrank-min-params",
        MIN_PARAMS,
        "--quiet",
        *extra,
    )
    assert result.exit_code == 0, result.output
    assert result.output == ""  # --quiet
    path = os.path.splitext(str(output))[0] + ".report.json"
    report = read_report(path)
    assert report["summary"]["report"] == os.path.abspath(path)
    return report


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_apply_reproduces_target_within_reported_errors(pair_files, tmp_path, dtype):
    source, target = pair_files
    out = tmp_path / "lora.safetensors"
    report = extract(source, target, out, "--rank", "8", "--output-dtype", dtype)
    base, tuned = load_file(source), load_file(target)
    merged = apply_reference(base, load_file(out))
    for key, entry in report["tensors"].items():
        if key not in tuned or key not in base:
            continue
        delta = tuned[key].float() - base[key].float()
        if entry["kind"] == "skipped":
            assert torch.equal(merged[key], base[key].float())
            continue
        actual = rel_error(merged[key], tuned[key].float(), delta)
        assert actual <= entry["rel_error"] * 1.001 + 1e-6, (key, actual, entry)
    kinds = {k: e["kind"] for k, e in report["tensors"].items()}
    assert kinds == {
        "blocks.0.attn.q.weight": "lowrank",
        "blocks.0.attn.q.bias": "diff",
        "blocks.0.ffn.0.weight": "lowrank",
        "blocks.0.ffn.0.bias": "diff",
        "blocks.0.modulation": "diff",
        "blocks.0.norm.weight": "skipped",
        "patch_embedding.weight": "diff",
        "head.weight": "diff",
    }
    assert report["tensors"]["blocks.0.attn.q.weight"]["rel_error"] < 0.05


def test_output_naming_is_lightx2vs(pair_files, tmp_path):
    out = tmp_path / "lora.safetensors"
    report = extract(*pair_files, out, "--rank", "4")
    lora = load_file(out)
    # No .alpha keys: alpha = rank, the scale (1) every loader reads where alpha is absent.
    assert set(lora) == {
        "diffusion_model.blocks.0.attn.q.lora_up.weight",
        "diffusion_model.blocks.0.attn.q.lora_down.weight",
        "diffusion_model.blocks.0.ffn.0.lora_up.weight",
        "diffusion_model.blocks.0.ffn.0.lora_down.weight",
        "diffusion_model.blocks.0.attn.q.diff_b",
        "diffusion_model.blocks.0.ffn.0.diff_b",
        "diffusion_model.blocks.0.diff_m",
        "diffusion_model.patch_embedding.diff",
        "diffusion_model.head.lora_up.weight",
        "diffusion_model.head.lora_down.weight",
    }
    assert lora["diffusion_model.blocks.0.ffn.0.lora_up.weight"].shape == (160, 4)
    assert lora["diffusion_model.blocks.0.ffn.0.lora_down.weight"].shape == (4, 96)
    # head.weight (8x32) is below MIN_PARAMS: its diff D as the exact pair I @ D.
    assert torch.equal(lora["diffusion_model.head.lora_up.weight"], torch.eye(8).bfloat16())
    assert lora["diffusion_model.head.lora_down.weight"].shape == (8, 32)
    assert lora["diffusion_model.head.lora_down.weight"].dtype == torch.bfloat16
    # The 5-D patch embedding (20480 elements) is at least MIN_PARAMS: a diff, with a note.
    entry = report["tensors"]["patch_embedding.weight"]
    assert {k: v for k, v in entry.items() if k not in ("rel_error", "seconds")} == {
        "kind": "diff",
        "note": PATCH_NOTE,
        "rank": None,
        "kernel_rel_error": 0.0,
        "shape": [64, 4, 2, 2, 20],
        "status": "computed",
    }
    # The 3-D modulation is small: a plain diff without a note.
    assert "note" not in report["tensors"]["blocks.0.modulation"]
    assert report["summary"]["source_only"] == ["only_in_base.weight"]
    assert report["summary"]["target_only"] == ["only_in_target.bias"]


def test_nd_tensor_has_a_note_from_lowrank_min_params_on(pair_files, tmp_path):
    at = extract(*pair_files, tmp_path / "at.safetensors", "--lowrank-min-params", PATCH_NUMEL)
    entry = at["tensors"]["patch_embedding.weight"]
    assert (entry["kind"], entry["note"]) == ("diff", PATCH_NOTE)
    above = extract(
        *pair_files, tmp_path / "above.safetensors", "--lowrank-min-params", PATCH_NUMEL + 1
    )
    entry = above["tensors"]["patch_embedding.weight"]
    assert entry["kind"] == "diff" and "note" not in entry


def test_diff_only_and_rank_capped(pair_files, tmp_path):
    report = extract(*pair_files, tmp_path / "d.safetensors", "--diff-only")
    assert report["summary"]["kinds"] == {"diff": 7, "skipped": 1}
    assert all("note" not in e for e in report["tensors"].values() if e["kind"] == "diff")
    assert set(load_file(tmp_path / "d.safetensors")) == {
        "diffusion_model.blocks.0.attn.q.diff",
        "diffusion_model.blocks.0.attn.q.diff_b",
        "diffusion_model.blocks.0.ffn.0.diff",
        "diffusion_model.blocks.0.ffn.0.diff_b",
        "diffusion_model.blocks.0.diff_m",
        "diffusion_model.patch_embedding.diff",
        "diffusion_model.head.diff",
    }
    report = extract(*pair_files, tmp_path / "r.safetensors", "--rank", "500")
    assert report["tensors"]["blocks.0.ffn.0.weight"]["rank"] == 96
    assert report["tensors"]["blocks.0.ffn.0.weight"]["kernel_rel_error"] < 1e-3


def test_sharded_and_single_file_hold_the_same_tensors(pair_files, tmp_path):
    extract(*pair_files, tmp_path / "one.safetensors", "--output-dtype", "fp32")
    extract(
        *pair_files,
        tmp_path / "many.safetensors",
        "--output-dtype",
        "fp32",
        "--max-shard-size",
        "30KB",
    )
    index = json.loads((tmp_path / "many.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"many-{i:05d}-of-00005.safetensors" for i in (1, 2, 3, 4, 5)]
    assert not (tmp_path / "many.safetensors").exists()
    sharded, single = (
        load_output(str(tmp_path / "many.safetensors")),
        load_file(tmp_path / "one.safetensors"),
    )
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in single.values()
    )
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)


def test_two_runs_give_byte_identical_files(pair_files, tmp_path):
    extract(*pair_files, tmp_path / "a.safetensors")
    extract(*pair_files, tmp_path / "b.safetensors", "--workers", "1")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_pytorch_output_and_inputs(pair_files, tmp_path):
    base, tuned = pair_tensors()
    torch.save({"state_dict": base}, tmp_path / "base.pt")
    torch.save(tuned, tmp_path / "tuned.pth")
    extract(
        str(tmp_path / "base.pt"),
        str(tmp_path / "tuned.pth"),
        tmp_path / "lora",
        "--source-type",
        "pytorch",
        "--target-type",
        "pytorch",
        "--output-format",
        "pytorch",
    )
    from_pt = torch.load(tmp_path / "lora.pt", weights_only=True)
    with zipfile.ZipFile(tmp_path / "lora.pt") as archive:
        assert archive.testzip() is None  # every record's CRC-32 is its bytes'
    extract(*pair_files, tmp_path / "lora.safetensors")
    from_st = load_file(tmp_path / "lora.safetensors")
    assert from_pt.keys() == from_st.keys()
    assert all(torch.equal(from_pt[k], from_st[k]) for k in from_st)


def test_sharded_inputs(tmp_path):
    base, tuned = pair_tensors()
    save_sharded(base, str(tmp_path / "base"), shards=3)
    save_sharded(tuned, str(tmp_path / "tuned"), shards=2, index=False)
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    extract(str(tmp_path / "base"), str(tmp_path / "tuned"), tmp_path / "a.safetensors")
    extract(
        str(tmp_path / "base.safetensors"),
        str(tmp_path / "tuned.safetensors"),
        tmp_path / "b.safetensors",
    )
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_full_svd_is_the_accuracy_reference(pair_files, tmp_path):
    fast = extract(*pair_files, tmp_path / "fast.safetensors", "--rank", "4")
    exact = extract(*pair_files, tmp_path / "exact.safetensors", "--rank", "4", "--svd", "full")
    for key in ("blocks.0.attn.q.weight", "blocks.0.ffn.0.weight"):
        ratio = fast["tensors"][key]["kernel_rel_error"] / exact["tensors"][key]["kernel_rel_error"]
        assert 1.0 - 1e-6 <= ratio <= 1.01


def test_help_lists_every_flag():
    result = run_cli("extract", "--help")
    assert result.exit_code == 0, result.output
    for flag in (
        "--source-model",
        "--target-model",
        "--output",
        "--source-type",
        "--target-type",
        "--output-format",
        "--rank",
        "--output-dtype",
        "--diff-only",
        "--lowrank-min-params",
        "--device",
        "--workers",
        "--max-shard-size",
        "--report",
        "--work-dir",
        "--no-resume",
        "--svd",
    ):
        assert flag in result.output, flag
    assert run_cli("--help").exit_code == 0
    assert run_cli("clean", "--help").exit_code == 0
