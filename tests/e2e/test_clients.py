"""Every key style, extracted from a tiny Wan 2.1 model held in either layout, loaded by the real
clients: diffusers' public LoRA path (``WanPipeline.load_lora_weights`` then ``fuse_lora``) and
``PeftModel.from_pretrained``. What a client applies equals ``loraforge merge`` of the same file
and equals, entry by entry, what loraforge's client rules (``lora/clients``) predict; the rules
for ComfyUI and LightX2V, which cannot be installed, are facts tested in
tests/pipeline/lora/test_clients.py. Also Wan 2.2's two transformers with a LoRA each."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.pipeline.lora.clients import LoraFile, client_loadings, label
from loraforge.pipeline.lora.keys import map_lora
from tests.helpers import wan
from tests.helpers.cli import run_cli

LAYOUTS = ("original", "diffusers")
STYLES = ("lightx2v", "kohya", "diffusers", "peft")
logging.getLogger("diffusers").setLevel(logging.ERROR)  # "No LoRA keys ..." is asserted below


@pytest.fixture(scope="module")
def wan_pair(tmp_path_factory):
    """The tiny model's base and fine-tune, saved in each layout; the diffusers-named tensors."""
    folder = tmp_path_factory.mktemp("wan")
    base = {k: v.detach().clone() for k, v in wan.model().state_dict().items()}
    tuned = wan.fine_tune(base)
    paths = {}
    for layout, named in (("diffusers", dict), ("original", wan.to_original)):
        (folder / layout).mkdir()
        paths[layout] = (
            str(folder / layout / "base.safetensors"),
            str(folder / layout / "ft.safetensors"),
        )
        save_file(named(base), paths[layout][0])
        save_file(named(tuned), paths[layout][1])
    return folder, base, paths


def extract(paths, output, *extra) -> dict:
    result = run_cli(
        "extract", "--source-model", paths[0], "--target-model", paths[1], "--output", output,
        "--rank", "8", "--lowrank-min-params", "0", "--output-dtype", "fp32", "--quiet", *extra,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return {"stderr": result.stderr}


@pytest.fixture(scope="module")
def extracted(wan_pair) -> dict:
    """(layout, style) → (weights file, adapter dir or None, what extract warned)."""
    folder, _base, paths = wan_pair
    files = {}
    for layout in LAYOUTS:
        for style in STYLES:
            out = folder / f"{layout}_{style}"
            run = extract(paths[layout], out if style == "peft" else f"{out}.safetensors",
                          "--key-style", style)  # fmt: skip
            weights = out / "adapter_model.safetensors" if style == "peft" else f"{out}.safetensors"
            files[layout, style] = str(weights), str(out) if style == "peft" else None, run
    return files


def merged(wan_pair, lora: str, name: str) -> dict:
    """``loraforge merge`` of ``lora`` into the diffusers-named base, in fp32."""
    folder, _base, paths = wan_pair
    out = folder / f"merged_{name}.safetensors"
    result = run_cli(
        "merge", "--source-model", paths["diffusers"][0], "--lora-model", lora,
        "--output", out, "--output-dtype", "fp32", "--quiet", "--no-resume",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return load_file(out)


def diffusers_fused(base: dict, weights: str, **into) -> dict | Exception:
    """The fused weights after diffusers' public LoRA path, or what it raised."""
    from diffusers import WanPipeline

    model = wan.model(state=base)
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=model
    )
    try:
        pipe.load_lora_weights(weights, **into)
        pipe.fuse_lora()
    except Exception as e:  # noqa: BLE001 -- the client's refusal is what the test compares
        return e
    return plain_state(model)


def plain_state(model) -> dict:
    """A module's weights with peft's wrappers taken off (``base_layer``, ``lora_*``)."""
    return {
        k.replace(".base_layer", ""): v.detach().clone()
        for k, v in model.state_dict().items()
        if ".lora_" not in k
    }


def predicted_keys(weights: str, base: dict, client: str, peft_config: bool = False):
    """(refusal, base keys the client rule says it applies) for the LoRA file ``weights``."""
    shapes = {k: tuple(v.shape) for k, v in load_file(weights).items()}
    file = LoraFile.from_shapes(shapes, peft_config)
    loading = client_loadings(file)[client]
    if loading.refused:
        return loading.refused, set()
    by_key = {}
    for entry in file.entries:
        by_key[entry.diff_key or entry.up_key] = label(entry)
    alphas = {k: 1.0 for k in shapes if k.endswith(".alpha")}
    mapping = map_lora(shapes, {k: tuple(v.shape) for k, v in base.items()}, alphas=alphas)
    applied = set(loading.applied)
    return None, {p.base_key for p in mapping.patches if by_key[p.diff_key or p.up_key] in applied}


def changed(after: dict, base: dict) -> set[str]:
    """The tensors of ``after`` that differ from ``base``'s (``after`` may hold fewer)."""
    return {k for k in after if not torch.equal(after[k], base[k])}


def assert_equal_to_merge(after: dict, reference: dict, keys: set[str]) -> None:
    for key in keys:
        torch.testing.assert_close(after[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("style", ["lightx2v", "kohya", "diffusers"])
def test_diffusers_applies_what_the_rules_say_and_what_loraforge_merges(
    wan_pair, extracted, layout, style
):
    _folder, base, _paths = wan_pair
    weights, _adapter, _run = extracted[layout, style]
    refusal, predicted = predicted_keys(weights, base, "diffusers")
    fused = diffusers_fused(base, weights)
    if refusal:
        assert isinstance(fused, Exception), refusal
        return
    assert not isinstance(fused, Exception), fused
    assert changed(fused, base) == predicted
    assert_equal_to_merge(fused, merged(wan_pair, weights, f"{layout}_{style}"), predicted)


def test_the_default_style_loads_in_diffusers_comfyui_and_lightx2v(wan_pair, extracted):
    """From a Wan-original base: diffusers applies the 26 pairs and 26 bias diffs; what it
    cannot carry (modulation, norm and patch-embedding diffs) is named when the file is
    written; LightX2V applies all 69 entries, ComfyUI all but the 3 modulation diffs."""
    _folder, base, _paths = wan_pair
    weights, _adapter, run = extracted["original", "lightx2v"]
    shapes = {k: tuple(v.shape) for k, v in load_file(weights).items()}
    loadings = client_loadings(LoraFile.from_shapes(shapes))
    summary = {name: (len(x.applied), x.total, x.refused) for name, x in loadings.items()}
    assert summary == {
        "lightx2v": (69, 69, None),
        "comfyui": (66, 69, None),
        "diffusers": (52, 69, None),
        "peft": (0, 0, "not a PEFT adapter directory (no adapter_config.json)"),
    }
    assert set(loadings["comfyui"].not_applied) == {
        "diffusion_model.blocks.0.diff_m",
        "diffusion_model.blocks.1.diff_m",
        "diffusion_model.head.diff_m",
    }
    warned = [line for line in run["stderr"].splitlines() if line.startswith("warning: ")]
    assert warned == [
        f"warning: {loadings[c].summary()} (per tensor in the report)"
        for c in ("comfyui", "diffusers")
    ]
    report = json.load(open(weights.removesuffix(".safetensors") + ".report.json"))
    assert report["summary"]["clients"]["diffusers"]["applied"] == 52
    assert report["tensors"]["patch_embedding.weight"]["not_applied_by"] == {
        "diffusers": "diffusers drops it (its Wan converter reads no such diff)"
    }
    assert not isinstance(diffusers_fused(base, weights), Exception)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_peft_adapter_loads_with_peft_as_loraforge_merges_it(wan_pair, extracted, layout):
    """In diffusers' names it patches diffusers' model; in Wan's original names, a model with
    those module names (a shell of the Linear layers the adapter targets)."""
    from peft import PeftModel

    _folder, base, paths = wan_pair
    weights, adapter, _run = extracted[layout, "peft"]
    names = base if layout == "diffusers" else wan.to_original(base)
    target = wan.model(state=base) if layout == "diffusers" else linear_shell(names)
    fused = plain_state(PeftModel.from_pretrained(target, adapter).merge_and_unload())
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert all(pattern.startswith("^") for pattern in config["rank_pattern"])
    reference = merged(wan_pair, adapter, f"{layout}_peft")
    applied = {k for k in changed(fused, names)}
    assert len(applied) == 26  # every Linear weight; PEFT holds no diffs (named at write time)
    renamed = (
        {k: k for k in base}
        if layout == "diffusers"
        else dict(zip(wan.to_original(base), base, strict=True))
    )
    for key in applied:
        torch.testing.assert_close(fused[key], reference[renamed[key]], rtol=1e-5, atol=1e-6)


def linear_shell(state: dict) -> torch.nn.Module:
    """A module tree with an ``nn.Linear`` at every 2-D weight's path, holding the weights."""
    root = torch.nn.Module()
    for key, value in state.items():
        if not key.endswith(".weight") or value.dim() != 2:
            continue
        *parents, leaf = key.removesuffix(".weight").split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        linear = torch.nn.Linear(value.shape[1], value.shape[0], bias=f"{key[:-7]}.bias" in state)
        linear.weight.data.copy_(value)
        if linear.bias is not None:
            linear.bias.data.copy_(state[f"{key[:-7]}.bias"])
        node.add_module(leaf, linear)
    return root


@pytest.mark.slow
def test_wan22_two_transformers_each_take_their_own_lora(tmp_path):
    """Wan 2.2 A14B: the high-noise transformer and the low-noise ``transformer_2`` each get
    the LoRA extracted from their own fine-tune, as LightX2V's configs name them."""
    from diffusers import WanPipeline

    experts = {}
    for name, seed in (("high_noise_model", 0), ("low_noise_model", 5)):
        base = {k: v.detach().clone() for k, v in wan.model(seed=seed).state_dict().items()}
        paths = str(tmp_path / f"{name}_base.safetensors"), str(tmp_path / f"{name}_ft.safetensors")
        save_file(wan.to_original(base), paths[0])
        save_file(wan.to_original(wan.fine_tune(base, seed=seed + 1)), paths[1])
        lora = str(tmp_path / f"{name}_lora.safetensors")
        extract(paths, lora)
        experts[name] = base, lora
    high, low = (wan.model(state=experts[n][0]) for n in ("high_noise_model", "low_noise_model"))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None,
                       transformer=high, transformer_2=low, boundary_ratio=0.875)  # fmt: skip
    pipe.load_lora_weights(experts["high_noise_model"][1])
    pipe.load_lora_weights(experts["low_noise_model"][1], load_into_transformer_2=True)
    pipe.fuse_lora(components=["transformer", "transformer_2"])
    config = tmp_path / "wan_moe.json"
    config.write_text(json.dumps({"lora_configs": [
        {"name": n, "path": experts[n][1], "strength": 1.0} for n in experts
    ]}))  # fmt: skip
    for name, model in (("high_noise_model", high), ("low_noise_model", low)):
        base, _lora = experts[name]
        save_file(base, tmp_path / f"{name}_diffusers.safetensors")
        out = tmp_path / f"{name}_merged.safetensors"
        result = run_cli(
            "merge", "--source-model", tmp_path / f"{name}_diffusers.safetensors",
            "--config", config, "--config-name", name, "--output", out,
            "--output-dtype", "fp32", "--quiet",
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        fused = plain_state(model)
        applied = changed(fused, base)
        assert len(applied) == 52  # the 26 pairs and 26 bias diffs, as in Wan 2.1
        assert_equal_to_merge(fused, load_file(out), applied)


EDGE_CASES = {
    # name: keys (original names under diffusion_model.) with their shapes
    "alpha_on_head": {"head.head.lora_up.weight": (16, 2), "head.head.lora_down.weight": (2, 32),
                      "head.head.alpha": (), "blocks.0.self_attn.q.lora_up.weight": (32, 2),
                      "blocks.0.self_attn.q.lora_down.weight": (2, 32)},
    "alpha_on_blocks_only": {"head.head.lora_up.weight": (16, 2),
                             "head.head.lora_down.weight": (2, 32),
                             "blocks.0.self_attn.q.alpha": (),
                             "blocks.0.self_attn.q.lora_up.weight": (32, 2),
                             "blocks.0.self_attn.q.lora_down.weight": (2, 32)},
    "text_embedding_diff_alone": {"text_embedding.0.diff": (32, 32),
                                  "blocks.0.ffn.0.lora_up.weight": (64, 2),
                                  "blocks.0.ffn.0.lora_down.weight": (2, 32)},
    "head_diff_without_bias": {"head.head.diff": (16, 32), "blocks.0.norm3.diff": (32,)},
    "head_diff_with_bias": {"head.head.diff": (16, 32), "head.head.diff_b": (16,),
                            "blocks.0.norm3.diff": (32,), "blocks.1.diff_m": (1, 6, 32)},
    "no_blocks": {"head.head.lora_up.weight": (16, 2), "head.head.lora_down.weight": (2, 32)},
    "mixed_spellings": {"blocks.0.self_attn.q.lora_A.weight": (2, 32),
                        "blocks.0.self_attn.q.lora_B.weight": (32, 2),
                        "blocks.0.self_attn.k.lora_down.weight": (2, 32),
                        "blocks.0.self_attn.k.lora_up.weight": (32, 2)},
    "patch_embedding_pair": {"patch_embedding.lora_up.weight": (32, 2),
                             "patch_embedding.lora_down.weight": (2, 4, 1, 2, 2),
                             "blocks.0.self_attn.q.lora_up.weight": (32, 2),
                             "blocks.0.self_attn.q.lora_down.weight": (2, 32)},
    "block_weight_diff_and_bias": {"blocks.1.cross_attn.o.diff": (32, 32),
                                   "blocks.1.cross_attn.o.diff_b": (32,),
                                   "time_projection.1.diff_b": (192,)},
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_the_diffusers_rule_agrees_with_diffusers_on_hand_made_files(wan_pair, tmp_path, case):
    _folder, base, _paths = wan_pair
    g = torch.Generator().manual_seed(3)
    tensors = {
        f"diffusion_model.{k}": torch.randn(shape, generator=g) * 0.05 + (2.0 if not shape else 0)
        for k, shape in EDGE_CASES[case].items()
    }
    path = str(tmp_path / f"{case}.safetensors")
    save_file(tensors, path)
    refusal, predicted = predicted_keys(path, base, "diffusers")
    fused = diffusers_fused(base, path)
    assert isinstance(fused, Exception) == bool(refusal), (refusal, fused)
    if not refusal:
        assert changed(fused, base) == predicted


def test_a_rank_301_lora_in_bf16_keeps_alpha_exact(tmp_path):
    """At rank 301 a bf16 alpha would read 300 (scale 0.99668): alpha is fp32, and the merge
    is exactly W + up @ down."""
    g = torch.Generator().manual_seed(0)
    base = {"blocks.0.ffn.0.weight": torch.randn(320, 320, generator=g)}
    tuned = {
        "blocks.0.ffn.0.weight": base["blocks.0.ffn.0.weight"] + torch.randn(320, 320, generator=g)
    }
    save_file(base, tmp_path / "b.safetensors")
    save_file(tuned, tmp_path / "t.safetensors")
    out = str(tmp_path / "lora.safetensors")
    result = run_cli(
        "extract", "--source-model", tmp_path / "b.safetensors", "--target-model",
        tmp_path / "t.safetensors", "--output", out, "--rank", "301", "--key-style", "kohya",
        "--lowrank-min-params", "0",
        "--output-dtype", "bf16", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lora = load_file(out)
    alpha = lora["lora_unet_blocks_0_ffn_0.alpha"]
    assert (alpha.dtype, alpha.item()) == (torch.float32, 301.0)
    merged_out = tmp_path / "m.safetensors"
    result = run_cli("merge", "--source-model", tmp_path / "b.safetensors", "--lora-model", out,
                     "--output", merged_out, "--output-dtype", "fp32", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    up = lora["lora_unet_blocks_0_ffn_0.lora_up.weight"].float()
    down = lora["lora_unet_blocks_0_ffn_0.lora_down.weight"].float()
    want = base["blocks.0.ffn.0.weight"] + 1.0 * (up @ down)
    torch.testing.assert_close(
        load_file(merged_out)["blocks.0.ffn.0.weight"], want, rtol=0, atol=2e-6
    )


def test_anchored_patterns_keep_a_top_level_module_apart_from_block_modules(tmp_path):
    """proj_out at rank 2 beside blocks.N.proj_out at rank 4: an unanchored pattern would give
    every blocks.N.proj_out rank 2 (PEFT: size mismatch) and alpha 2 (loraforge's own merge)."""
    from peft import PeftModel

    g = torch.Generator().manual_seed(0)
    shell = {"proj_out.weight": torch.randn(8, 8, generator=g)}
    shell |= {f"blocks.{i}.proj_out.weight": torch.randn(8, 8, generator=g) for i in range(2)}
    ranks = {"proj_out": 2, "blocks.0.proj_out": 4, "blocks.1.proj_out": 4}
    lora = {}
    for module, rank in ranks.items():
        lora[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(8, rank, generator=g)
        lora[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(rank, 8, generator=g)
        lora[f"diffusion_model.{module}.alpha"] = torch.tensor(float(rank) / 2)  # scale 0.5
    save_file(shell, tmp_path / "base.safetensors")
    save_file(lora, tmp_path / "lora.safetensors")
    adapter = tmp_path / "adapter"
    result = run_cli("convert", tmp_path / "lora.safetensors", adapter, "--to", "peft",
                     "--base", tmp_path / "base.safetensors", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.load(open(adapter / "adapter_config.json"))
    assert (config["r"], config["rank_pattern"]) == (4, {"^proj_out": 2})
    fused = plain_state(PeftModel.from_pretrained(linear_shell(shell), adapter).merge_and_unload())
    out = tmp_path / "merged.safetensors"
    result = run_cli("merge", "--source-model", tmp_path / "base.safetensors", "--lora-model",
                     adapter, "--output", out, "--output-dtype", "fp32", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    ours = load_file(out)
    for module in ranks:
        key = f"{module}.weight"
        up, down = (
            lora[f"diffusion_model.{module}.lora_up.weight"],
            lora[f"diffusion_model.{module}.lora_down.weight"],
        )
        want = shell[key] + 0.5 * (up @ down)
        torch.testing.assert_close(ours[key], want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused[key], want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_convert_crosses_layouts_both_ways(wan_pair, extracted, tmp_path):
    """The default-style file (Wan's original names) converted to the diffusers style, without
    a base, holds diffusers' module names and loads there; converted back it is the same
    file's pairs again."""
    _folder, base, _paths = wan_pair
    weights, _adapter, _run = extracted["original", "lightx2v"]
    there = tmp_path / "diffusers"
    result = run_cli("convert", weights, there, "--to", "diffusers", "--quiet")
    assert result.exit_code == 0, result.output
    names = sorted(load_file(f"{there}.safetensors"))
    assert names[:2] == [
        "transformer.blocks.0.attn1.to_k.lora_A.weight",
        "transformer.blocks.0.attn1.to_k.lora_B.weight",
    ]
    fused = diffusers_fused(base, f"{there}.safetensors")
    assert len(changed(fused, base)) == 26
    assert_equal_to_merge(fused, merged(wan_pair, weights, "convert_source"), changed(fused, base))
    back = tmp_path / "back"
    result = run_cli("convert", f"{there}.safetensors", back, "--to", "lightx2v", "--quiet")
    assert result.exit_code == 0, result.output
    source = {k: v for k, v in load_file(weights).items() if ".lora_" in k}
    assert load_file(f"{back}.safetensors").keys() == source.keys()


def test_inspect_says_where_a_file_loads(extracted):
    weights, _adapter, _run = extracted["original", "lightx2v"]
    result = run_cli("inspect", weights)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.startswith("loads in ")]
    assert lines[:2] == ["loads in lightx2v: 69/69 applied", (
        "loads in comfyui: 66/69 applied; not: 3 × ComfyUI reads no .diff_m ('lora key not "
        "loaded')"
    )]  # fmt: skip
    assert lines[2].startswith("loads in diffusers: 52/69 applied; not: ")
    report = json.loads(run_cli("inspect", weights, "--json").stdout)
    assert report["clients"]["diffusers"]["applied"] == 52
    assert report["clients"]["peft"]["loads"] is False


def test_a_lora_in_one_layout_applies_and_verifies_against_a_model_in_the_other(
    wan_pair, extracted
):
    """The default-style file (Wan's original names) on diffusers' model: ``loraforge.apply``
    patches what ``merge`` patches, bit for bit, and ``verify`` finds the fine-tune."""
    import loraforge

    _folder, base, paths = wan_pair
    weights, _adapter, _run = extracted["original", "lightx2v"]
    model = wan.model(state=base)
    handle = loraforge.apply(model, [(weights, 1.0)], strict=True)
    reference = merged(wan_pair, weights, "apply_reference")
    state = model.state_dict()
    assert len(handle.touched) == 69  # every entry: loraforge applies norm and modulation diffs
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    handle.remove()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    result = run_cli(
        "verify", "--source-model", paths["diffusers"][0], "--target-model",
        paths["diffusers"][1], "--lora-model", weights, "--max-error", "1e-5", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["event"] == "summary" and summary["rel_error"] < 1e-5
