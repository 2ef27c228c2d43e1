"""``loraforge merge`` end to end on tiny generated checkpoints: the arithmetic, every LoRA
naming, the output layouts."""

import json
import os
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.pipeline.extract.command import extract
from loraforge.pipeline.extract.options import ExtractOptions, KernelOptions
from loraforge.pipeline.lora.config import LoraSpec, MergeConfig
from loraforge.pipeline.merge.command import merge
from loraforge.pipeline.merge.options import MergeOptions
from loraforge.pipeline.run.options import RunOptions
from tests.helpers.checkpoints import BASE_SHAPES, Q, lora_pair, make_base, rand, save_lora
from tests.helpers.reference import assert_close, lowrank_product, read_report


def run(base, loras, output, *, strengths=None, options=None, progress=None, **run_options):
    """The merge through the Python API on 2 CPU workers, fp32 output unless ``options`` says
    otherwise."""
    strengths = strengths or [1.0] * len(loras)
    config = MergeConfig(tuple(LoraSpec(str(p), s) for p, s in zip(loras, strengths, strict=True)))
    return merge(
        source_model=str(base),
        loras=config,
        output=str(output),
        options=options or MergeOptions(output_dtype="fp32"),
        run=RunOptions(**{"device": "cpu", "workers": 2, **run_options}),
        progress=progress,
    )


def test_two_loras_at_strengths_match_the_reference(tmp_path):
    base_path, base = make_base(tmp_path)
    a = {
        **lora_pair(f"diffusion_model.{Q}", ".lora_up.weight", ".lora_down.weight", seed=1),
        f"diffusion_model.{Q}.alpha": torch.tensor(8.0),
        "diffusion_model.blocks.0.attn.q.diff_b": rand(48, seed=2),
        **lora_pair("blocks.0.ffn.0", ".lora_up.weight", ".lora_down.weight", out=64, seed=3),
    }
    b = {
        **lora_pair(f"{Q}", ".lora_B.weight", ".lora_A.weight", rank=8, seed=4),
        "blocks.0.diff_m": rand(1, 6, 32, seed=5),
    }
    paths = [save_lora(tmp_path, "a.safetensors", a), save_lora(tmp_path, "b.safetensors", b)]
    out = tmp_path / "merged.safetensors"
    options = MergeOptions(alpha=0.5, output_dtype="fp32")
    report = run(base_path, paths, out, strengths=[0.8, -1.5], options=options)
    merged = load_file(out)

    pa, s_a, s_b, g = f"diffusion_model.{Q}.", 0.8, -1.5, 0.5
    expected_q = (
        base[f"{Q}.weight"].double()
        + s_a
        * g
        * (8.0 / 4)
        * lowrank_product(a[pa + "lora_up.weight"], a[pa + "lora_down.weight"])
        + s_b * g * 1.0 * lowrank_product(b[f"{Q}.lora_B.weight"], b[f"{Q}.lora_A.weight"])
    )
    assert_close(merged[f"{Q}.weight"], expected_q)
    assert_close(merged[f"{Q}.bias"], base[f"{Q}.bias"].double() + s_a * g * a[pa + "diff_b"])
    ffn = "blocks.0.ffn.0"
    assert_close(
        merged[f"{ffn}.weight"],
        base[f"{ffn}.weight"].double()
        + s_a * g * lowrank_product(a[f"{ffn}.lora_up.weight"], a[f"{ffn}.lora_down.weight"]),
    )
    assert_close(
        merged["blocks.0.modulation"],
        base["blocks.0.modulation"].double() + s_b * g * b["blocks.0.diff_m"],
    )
    for key in ("blocks.0.attn.k.weight", "blocks.0.norm.weight", "freqs_index"):
        assert torch.equal(merged[key], base[key])
    assert set(merged) == set(base)

    tensors = report["tensors"]
    assert tensors[f"{Q}.weight"]["loras"] == paths
    assert tensors[f"{Q}.weight"]["kind"] == "merged"
    assert tensors["freqs_index"]["kind"] == "copied"
    assert report["summary"]["kinds"] == {"copied": 4, "merged": 4}
    assert [lora["unmatched"] for lora in report["summary"]["loras"]] == [{}, {}]
    report_path = str(tmp_path / "merged.report.json")
    assert report["summary"]["report"] == report_path
    assert read_report(report_path)["summary"] == report["summary"]


def test_bf16_output_is_the_cast_of_the_fp32_merge(tmp_path):
    base_path, base = make_base(tmp_path, dtype=torch.bfloat16)
    lora = save_lora(
        tmp_path, "l.safetensors", lora_pair(Q, ".lora_up.weight", ".lora_down.weight")
    )
    run(base_path, [lora], tmp_path / "fp32.safetensors")
    run(base_path, [lora], tmp_path / "bf16.safetensors", options=MergeOptions())
    wide, narrow = (
        load_file(tmp_path / "fp32.safetensors"),
        load_file(tmp_path / "bf16.safetensors"),
    )
    for key, tensor in narrow.items():
        expected = wide[key].to(torch.bfloat16) if wide[key].is_floating_point() else wide[key]
        assert tensor.dtype == expected.dtype and torch.equal(tensor, expected), key
    assert torch.equal(narrow["blocks.0.norm.weight"], base["blocks.0.norm.weight"])
    assert narrow["freqs_index"].dtype == torch.int64


def test_extract_then_merge_reproduces_the_target(tmp_path):
    base_path, base = make_base(tmp_path)
    target = {}
    for i, (key, tensor) in enumerate(base.items()):
        if not tensor.is_floating_point() or key == "blocks.0.norm.weight":
            target[key] = tensor  # unchanged: the extraction skips it
        elif tensor.dim() == 2 and tensor.numel() >= 1000:  # low rank + a small tail
            delta = rand(tensor.shape[0], 3, seed=50 + i) @ rand(3, tensor.shape[1], seed=60 + i)
            target[key] = tensor + 0.1 * delta + 1e-2 * rand(*tensor.shape, seed=70 + i)
        else:
            target[key] = tensor + 0.01 * rand(*tensor.shape, seed=80 + i)
    target_path = str(tmp_path / "target.safetensors")
    save_file(target, target_path)
    lora = str(tmp_path / "lora.safetensors")
    extraction = extract(
        source_model=base_path,
        target_model=target_path,
        output=lora,
        options=ExtractOptions(
            kernel=KernelOptions(rank=4), lowrank_min_params=1000, output_dtype="fp32"
        ),
        run=RunOptions(device="cpu", workers=2),
    )
    run(base_path, [lora], tmp_path / "merged.safetensors")
    merged = load_file(tmp_path / "merged.safetensors")
    checked = 0
    for key, entry in extraction["tensors"].items():
        if entry["kind"] not in ("lowrank", "diff"):
            continue
        delta = (target[key] - base[key]).double()
        error = float((merged[key].double() - target[key].double()).norm() / delta.norm())
        assert error <= entry["rel_error"] * 1.001 + 1e-5, (key, error, entry["rel_error"])
        checked += 1
    assert checked == 6
    assert extraction["summary"]["kinds"] == {"diff": 3, "lowrank": 3, "skipped": 2}
    assert torch.equal(merged["blocks.0.norm.weight"], base["blocks.0.norm.weight"])


Q_UP_DOWN = [
    (f"diffusion_model.{Q}", ".lora_up.weight", ".lora_down.weight"),
    (Q, "_lora.up.weight", "_lora.down.weight"),
    (f"base_model.model.{Q}", ".lora_B.weight", ".lora_A.weight"),
    (Q, ".lora_B", ".lora_A"),
    (f"transformer.{Q}", ".lora_B.default.weight", ".lora_A.default.weight"),
    (f"unet.{Q}", ".lora.up.weight", ".lora.down.weight"),
    (f"model.{Q}", ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    ("lora_unet_blocks_0_attn_q", ".lora_up.weight", ".lora_down.weight"),
]


@pytest.mark.parametrize("with_alpha", [False, True], ids=["no-alpha", "alpha"])
@pytest.mark.parametrize(
    "module, up, down",
    Q_UP_DOWN,
    ids=["lora_up", "_lora", "peft", "mochi", "peft_default", "lora.up", "diffusers", "kohya"],
)
def test_every_lowrank_naming(tmp_path, module, up, down, with_alpha):
    base_path, base = make_base(tmp_path)
    tensors = lora_pair(module, up, down)
    if with_alpha:
        tensors[f"{module}.alpha"] = torch.tensor(2.0)
    lora = save_lora(tmp_path, "lora.safetensors", tensors)
    report = run(base_path, [lora], tmp_path / "out.safetensors", strengths=[0.7])
    scale = 2.0 / 4 if with_alpha else 1.0
    expected = base[f"{Q}.weight"].double() + 0.7 * scale * lowrank_product(
        tensors[module + up], tensors[module + down]
    )
    assert_close(load_file(tmp_path / "out.safetensors")[f"{Q}.weight"], expected)
    assert report["summary"]["loras"][0]["unmatched"] == {}


@pytest.mark.parametrize(
    "key, target",
    [
        ("diffusion_model.blocks.0.attn.q.diff", f"{Q}.weight"),
        ("blocks.0.attn.q.diff_b", f"{Q}.bias"),
        ("model.blocks.0.diff_m", "blocks.0.modulation"),
        ("lora_unet_blocks_0_norm.diff", "blocks.0.norm.weight"),
    ],
)
def test_every_diff_naming(tmp_path, key, target):
    base_path, base = make_base(tmp_path)
    diff = rand(*BASE_SHAPES[target], seed=9)
    lora = save_lora(tmp_path, "lora.safetensors", {key: diff})
    run(base_path, [lora], tmp_path / "out.safetensors", strengths=[2.0])
    assert_close(load_file(tmp_path / "out.safetensors")[target], base[target].double() + 2 * diff)


def _peft_tensors():
    return {
        **lora_pair(f"base_model.model.{Q}", ".lora_B.weight", ".lora_A.weight"),
        **lora_pair("base_model.model.blocks.0.ffn.0", ".lora_B.weight", ".lora_A.weight", out=64),
    }


PEFT_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": {"ffn.0": 2}}


@pytest.mark.parametrize("layout", ["directory", "file-beside-config", "bin-directory"])
def test_peft_adapters(tmp_path, layout):
    base_path, base = make_base(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    tensors = _peft_tensors()
    if layout == "bin-directory":
        torch.save(tensors, adapter / "adapter_model.bin")
    else:
        save_lora(adapter, "adapter_model.safetensors", tensors)
    given = adapter / "adapter_model.safetensors" if layout == "file-beside-config" else adapter
    report = run(base_path, [given], tmp_path / "out.safetensors")
    merged = load_file(tmp_path / "out.safetensors")
    p = "base_model.model."
    for module, scale in ((Q, 8 / 4), ("blocks.0.ffn.0", 2 / 4)):
        up, down = tensors[f"{p}{module}.lora_B.weight"], tensors[f"{p}{module}.lora_A.weight"]
        expected = base[f"{module}.weight"].double() + scale * lowrank_product(up, down)
        assert_close(merged[f"{module}.weight"], expected)
    assert report["summary"]["loras"][0]["peft"]["lora_alpha"] == 8


def test_pytorch_lora_and_config_alpha(tmp_path):
    """A ``.pt`` LoRA (format from its suffix) and LightX2V's per-LoRA config ``alpha``."""
    base_path, base = make_base(tmp_path)
    tensors = lora_pair(Q, ".lora_up.weight", ".lora_down.weight")
    torch.save(tensors, tmp_path / "lora.pt")
    config = MergeConfig((LoraSpec(str(tmp_path / "lora.pt"), 1.0, alpha=1.0),))
    merge(
        source_model=base_path,
        loras=config,
        output=str(tmp_path / "out.safetensors"),
        options=MergeOptions(output_dtype="fp32"),
        run=RunOptions(device="cpu"),
    )
    up, down = tensors[f"{Q}.lora_up.weight"], tensors[f"{Q}.lora_down.weight"]
    expected = base[f"{Q}.weight"].double() + 0.25 * lowrank_product(up, down)
    assert_close(load_file(tmp_path / "out.safetensors")[f"{Q}.weight"], expected)


def test_unmatched_keys_are_reported(tmp_path):
    base_path, _ = make_base(tmp_path)
    tensors = {
        **lora_pair(Q, ".lora_up.weight", ".lora_down.weight"),
        **lora_pair("blocks.9.nowhere", ".lora_up.weight", ".lora_down.weight"),
        **lora_pair("blocks.0.attn.k", ".lora_up.weight", ".lora_down.weight", inp=31),
        **lora_pair("blocks.0.ffn.0", ".lora_up.weight", ".lora_down.weight", out=64),
        "blocks.0.ffn.0.lora_mid.weight": rand(4, 4, 1, 1),
        "patch_embedding.lora_up.weight": rand(16, 4),
        "freqs_index.diff": rand(12),
        "some_metadata": rand(2),
    }
    lora = save_lora(tmp_path, "lora.safetensors", tensors)
    events = []
    report = run(
        base_path, [lora], tmp_path / "out.safetensors", progress=lambda e, i: events.append((e, i))
    )
    unmatched = report["summary"]["loras"][0]["unmatched"]
    mid = "has a lora_mid (LoCon Tucker): up@down alone is not its delta"
    assert unmatched == {
        "blocks.9.nowhere.lora_up.weight": "targets no base tensor",
        "blocks.9.nowhere.lora_down.weight": "targets no base tensor",
        "blocks.0.attn.k.lora_up.weight": "shape mismatch: up@down is 48x31 but base is 48x32",
        "blocks.0.attn.k.lora_down.weight": "shape mismatch: up@down is 48x31 but base is 48x32",
        "blocks.0.ffn.0.lora_up.weight": mid,
        "blocks.0.ffn.0.lora_down.weight": mid,
        "blocks.0.ffn.0.lora_mid.weight": "lora_mid (LoCon mid) ignored",
        "patch_embedding.lora_up.weight": "up without down",
        "freqs_index.diff": "targets no base tensor",
        "some_metadata": "not a LoRA key name",
    }
    assert report["summary"]["loras"][0]["patches"] == 1
    assert [e for e, _ in events][:2] == ["loras", "start"]
    assert events[0][1]["loras"][0]["unmatched"] == unmatched


def test_shards_and_pytorch_hold_the_same_tensors(tmp_path):
    base_path, _ = make_base(tmp_path)
    lora = save_lora(
        tmp_path, "l.safetensors", lora_pair(Q, ".lora_up.weight", ".lora_down.weight")
    )
    run(base_path, [lora], tmp_path / "one.safetensors")
    one = load_file(tmp_path / "one.safetensors")
    sharded = MergeOptions(output_dtype="fp32", max_shard_size=10_000)
    report = run(base_path, [lora], tmp_path / "sharded.safetensors", options=sharded)
    files = report["summary"]["files"]
    assert files == [
        *(str(tmp_path / f"sharded-{i:05d}-of-00004.safetensors") for i in (1, 2, 3, 4)),
        str(tmp_path / "sharded.safetensors.index.json"),
    ]
    index = json.loads((tmp_path / "sharded.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(one)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in one.values()
    )
    pieces = {}
    for name in set(index["weight_map"].values()):
        pieces.update(load_file(tmp_path / name))
    as_pt = MergeOptions(output_dtype="fp32", output_format="pytorch")
    run(base_path, [lora], tmp_path / "merged", options=as_pt)
    pt = torch.load(tmp_path / "merged.pt", weights_only=True)
    with zipfile.ZipFile(tmp_path / "merged.pt") as archive:
        assert archive.testzip() is None  # the tasks' CRC-32s are the zip records'
    for key, tensor in one.items():
        assert torch.equal(pieces[key], tensor) and torch.equal(pt[key], tensor), key


def test_two_runs_give_identical_bytes(tmp_path):
    base_path, _ = make_base(tmp_path, dtype=torch.bfloat16)
    lora = save_lora(
        tmp_path, "l.safetensors", lora_pair(Q, ".lora_up.weight", ".lora_down.weight")
    )
    outputs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run(base_path, [lora], tmp_path / name / "m.safetensors", options=MergeOptions())
        outputs.append((tmp_path / name / "m.safetensors").read_bytes())
        assert not os.path.exists(tmp_path / name / "m.safetensors.work")
    assert outputs[0] == outputs[1]
