"""No run writes NaN or Inf and reports success: strengths and alphas from every source are
refused before any work when NaN, infinite or beyond float32, and a tensor loraforge computes
is checked finite as it is cast to the output dtype (docs/safety.md, "Numbers").

Each refusal: its exit code, exactly one ``error:`` line (the exact text), no traceback, and
the tree of inputs byte for byte as before with nothing new in it but the row's ``leaves``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.cli import run_cli
from tests.helpers.tree import changes, snapshot, working_copy

Q = "blocks.0.attn.q"
RANGE = "float32's range (±3.4e+38), in which LoRAs are applied"
FP16 = "fp16 (largest finite value ±65504)"
WIDER = "pass --output-dtype bf16 or fp32, which reach ±3.4e+38"
PEFT_HINT = "set it to the alpha the LoRA was trained with: PEFT scales by lora_alpha / r"


def factors(rank=4, out=48, inp=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=g) * 0.1, torch.randn(rank, inp, generator=g) * 0.1


def peft_dir(root: str, name: str, config: str) -> None:
    """A PEFT adapter whose adapter_config.json is ``config`` verbatim (NaN literals kept)."""
    os.makedirs(os.path.join(root, name))
    up, down = factors()
    save_file(
        {
            f"base_model.model.{Q}.lora_B.weight": up,
            f"base_model.model.{Q}.lora_A.weight": down,
        },
        os.path.join(root, name, "adapter_model.safetensors"),
    )
    with open(os.path.join(root, name, "adapter_config.json"), "w") as f:
        f.write(config)


def build(root: str) -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 4).masked_fill(torch.ones(4, 4).triu(1).bool(), -math.inf)
    base = {
        f"{Q}.weight": torch.randn(48, 32, generator=g),
        f"{Q}.bias": torch.randn(48, generator=g),
        "mask": mask,  # the base's own -Inf: carried as it is
    }
    save_file(base, os.path.join(root, "base.safetensors"))
    up, down = factors()
    save_file(
        {f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down, f"{Q}.alpha": torch.tensor(4.0)},
        os.path.join(root, "lora.safetensors"),
    )
    save_file(  # up @ down = 4 everywhere
        {f"{Q}.lora_up.weight": torch.ones(48, 4), f"{Q}.lora_down.weight": torch.ones(4, 32)},
        os.path.join(root, "ones.safetensors"),
    )
    save_file(  # alpha 64 at rank 4: scale 16
        {
            f"{Q}.lora_up.weight": up,
            f"{Q}.lora_down.weight": down,
            f"{Q}.alpha": torch.tensor(64.0),
        },
        os.path.join(root, "scale16.safetensors"),
    )
    save_file(
        {
            f"{Q}.lora_up.weight": up,
            f"{Q}.lora_down.weight": down,
            f"{Q}.alpha": torch.tensor(1e300, dtype=torch.float64),
        },
        os.path.join(root, "alpha_f64.safetensors"),
    )
    save_file(
        {f"transformer.{Q}.lora_B.weight": up, f"transformer.{Q}.lora_A.weight": down},
        os.path.join(root, "diffusers.safetensors"),
        metadata={
            "lora_adapter_metadata": '{"transformer.r": 4, "transformer.lora_alpha": Infinity}'
        },
    )
    peft_dir(root, "peft_nan", '{"r": 4, "lora_alpha": NaN}')
    peft_dir(root, "peft_neg_inf", '{"r": 4, "lora_alpha": -Infinity}')
    peft_dir(root, "peft_huge", '{"r": 4, "lora_alpha": 1e39}')
    peft_dir(root, "peft_pattern_nan", '{"r": 4, "lora_alpha": 4, "alpha_pattern": {"q": NaN}}')
    peft_dir(root, "peft_r_untargeted", '{"r": 8, "lora_alpha": 8, "target_modules": ["k", "v"]}')
    peft_dir(
        root,
        "peft_rank_pattern",
        '{"r": 4, "lora_alpha": 4, "rank_pattern": {"attn.q": 2}, "target_modules": ["q"]}',
    )
    configs = {
        "strength.json": {"lora_configs": [{"path": "lora.safetensors", "strength": 4e38}]},
        "strength_model.json": {"lora_path": "lora.safetensors", "strength_model": -1e39},
    }
    for name, data in configs.items():
        with open(os.path.join(root, name), "w") as f:
            json.dump(data, f)
    # an extraction whose bias changes by 1e5: finite in fp32, past fp16's ±65504
    target = {k: v.clone() for k, v in base.items()}
    target[f"{Q}.bias"] += 1e5
    save_file(target, os.path.join(root, "target.safetensors"))


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("nonfinite"))
    build(root)
    return root


@pytest.fixture
def tree(master, tmp_path) -> str:
    return working_copy(master, tmp_path)


@dataclass(frozen=True)
class Row:
    argv: tuple[str, ...]
    code: int
    message: str
    leaves: tuple[str, ...] = ()


def row(name, argv, code, message, leaves=()):
    return pytest.param(Row(tuple(argv), code, message, tuple(leaves)), id=name)


def merge(*args, lora="{r}/lora.safetensors"):
    loras = ("--lora-model", lora) if lora else ()
    return (
        "merge", "--quiet", "--source-model", "{r}/base.safetensors", *loras,
        "--output", "{r}/out/m.safetensors", *args,
    )  # fmt: skip


def resize(*args, lora="{r}/lora.safetensors"):
    return (
        "resize", "--quiet", "--lora-model", lora, "--output", "{r}/out/r.safetensors",
        "--rank", "2", *args,
    )  # fmt: skip


ROWS = [
    # strengths and alphas, before any work
    row(
        "merge-strength-past-fp32",
        merge("--strength", "5e38"),
        2,
        f"--strength 5e+38 is outside {RANGE} (give a smaller --strength)",
    ),
    row(
        "merge-strength-negative-past-fp32",
        merge("--strength", "-1e100"),
        2,
        f"--strength -1e+100 is outside {RANGE} (give a smaller --strength)",
    ),
    row(
        "merge-alpha-past-fp32",
        merge("--alpha", "1e40"),
        2,
        f"--alpha 1e+40 is outside {RANGE} (give a smaller --alpha)",
    ),
    row(
        "resize-strength-past-fp32",
        resize("--strength", "2e300"),
        2,
        f"--strength 2e+300 is outside {RANGE} (give a smaller --strength)",
    ),
    row(
        "config-strength-past-fp32",
        merge("--config", "{r}/strength.json", lora=None),
        2,
        f"{{r}}/strength.json: lora_configs[0]: 'strength' 4e+38 is outside {RANGE}",
    ),
    row(
        "config-strength-model-past-fp32",
        merge("--config", "{r}/strength_model.json", lora=None),
        2,
        f"{{r}}/strength_model.json: 'strength_model' -1e+39 is outside {RANGE}",
    ),
    row(
        "strength-times-scale-past-fp32",
        merge("--strength", "3e37", lora="{r}/scale16.safetensors"),
        2,
        f"{{r}}/scale16.safetensors: tensor '{Q}.lora_up.weight': strength 3e+37 × scale 16 = "
        f"4.8e+38 is outside {RANGE} (lower the strength (or the alpha))",
    ),
    row(
        "alpha-tensor-past-fp32",
        merge(lora="{r}/alpha_f64.safetensors"),
        1,
        f"{{r}}/alpha_f64.safetensors: tensor '{Q}.alpha': alpha 1e+300 is outside {RANGE}",
    ),
    row(
        "peft-alpha-nan",
        merge(lora="{r}/peft_nan"),
        1,
        f"{{r}}/peft_nan/adapter_config.json: 'lora_alpha' must be finite, got nan ({PEFT_HINT})",
    ),
    row(
        "peft-alpha-minus-infinity",
        merge(lora="{r}/peft_neg_inf"),
        1,
        f"{{r}}/peft_neg_inf/adapter_config.json: 'lora_alpha' must be finite, got -inf "
        f"({PEFT_HINT})",
    ),
    row(
        "peft-alpha-past-fp32",
        resize(lora="{r}/peft_huge"),
        1,
        f"{{r}}/peft_huge/adapter_config.json: 'lora_alpha' 1e+39 is outside {RANGE} ({PEFT_HINT})",
    ),
    row(
        "peft-alpha-pattern-nan",
        merge(lora="{r}/peft_pattern_nan"),
        1,
        f"{{r}}/peft_pattern_nan/adapter_config.json: 'alpha_pattern' 'q' must be finite, got "
        f"nan ({PEFT_HINT})",
    ),
    row(
        "diffusers-metadata-alpha-infinity",
        merge(lora="{r}/diffusers.safetensors"),
        1,
        f"{{r}}/diffusers.safetensors (header lora_adapter_metadata): 'lora_alpha' must be "
        f"finite, got inf ({PEFT_HINT})",
    ),
    # a PEFT config whose rank for a module is not its factors'
    row(
        "peft-r-of-an-untargeted-module",
        merge(lora="{r}/peft_r_untargeted"),
        1,
        f"{{r}}/peft_r_untargeted/adapter_config.json: module '{Q}' holds "
        "rank-4 factors but 'r' gives it rank 8, and it is not in target_modules, so PEFT would "
        "not load it at all (set 'r' or 'rank_pattern' to the factors' rank, or drop the "
        "module's keys)",
    ),
    row(
        "peft-rank-pattern-of-a-targeted-module",
        resize(lora="{r}/peft_rank_pattern"),
        1,
        f"{{r}}/peft_rank_pattern/adapter_config.json: module '{Q}' holds "
        "rank-4 factors but 'rank_pattern' gives it rank 2 (set 'r' or 'rank_pattern' to the "
        "factors' rank, or drop the module's keys)",
    ),
    # results checked as they are cast
    row(
        "merge-fp16-overflow",
        merge("--strength", "2e4", "--output-dtype", "fp16", lora="{r}/ones.safetensors"),
        1,
        f"tensor '{Q}.weight': would be written holding NaN or Inf as {FP16}; made from "
        f"{{r}}/base.safetensors + {{r}}/ones.safetensors at strength 20000 × scale 1 (lower "
        f"--strength or --alpha, or {WIDER})",
    ),
    row(
        "merge-bf16-overflow",
        merge("--strength", "1e38", lora="{r}/ones.safetensors"),
        1,
        f"tensor '{Q}.weight': would be written holding NaN or Inf as bf16 (largest finite "
        f"value ±3.3895e+38); made from {{r}}/base.safetensors + {{r}}/ones.safetensors at "
        "strength 1e+38 × scale 1 (lower --strength or --alpha)",
    ),
    row(
        "merge-fp8-overflow",
        merge("--strength", "1e38", "--output-dtype", "fp8_e4m3fn", lora="{r}/ones.safetensors"),
        1,
        f"tensor '{Q}.weight': would be written holding NaN or Inf as fp32 (largest finite "
        f"value ±3.4028e+38); made from {{r}}/base.safetensors + {{r}}/ones.safetensors at "
        "strength 1e+38 × scale 1 (lower --strength or --alpha)",  # its fp32 value, quantized
    ),
    row(
        "resize-fp16-overflow",
        resize("--strength", "1e11", "--output-dtype", "fp16"),
        1,
        f"tensor 'diffusion_model.{Q}.lora_up.weight': would be written holding NaN or Inf as "
        f"{FP16}; made from {{r}}/lora.safetensors at strength 1e+11 × scale 1 (lower "
        f"--strength, or {WIDER})",
        leaves=("out/r.safetensors.work",),  # finished tensors, for a rerun
    ),
    row(
        "extract-fp16-overflow",
        (
            "extract",
            "--quiet",
            "--source-model",
            "{r}/base.safetensors",
            "--target-model",
            "{r}/target.safetensors",
            "--output",
            "{r}/out/e.safetensors",
            "--output-dtype",
            "fp16",
        ),  # fmt: skip
        1,
        f"tensor 'diffusion_model.{Q}.diff_b': would be written holding NaN or Inf as {FP16}; "
        f"made from {{r}}/target.safetensors − {{r}}/base.safetensors ({WIDER})",
        leaves=("out/e.safetensors.work",),
    ),
]


@pytest.mark.parametrize("case", ROWS)
def test_refused(tree, case: Row):
    before = snapshot(tree)
    result = run_cli(*(arg.replace("{r}", tree) for arg in case.argv))
    assert result.exit_code == case.code, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert result.stderr == f"error: {case.message.replace('{r}', tree)}\n"
    changed, new = changes(before, snapshot(tree), case.leaves)
    assert (changed, new) == ([], [])


def test_json_gets_the_error_event_and_a_rerun_says_the_same(tree):
    argv = [a.replace("{r}", tree) for a in merge("--strength", "1e39", "--json")]
    first, second = run_cli(*argv), run_cli(*argv)
    message = f"--strength 1e+39 is outside {RANGE} (give a smaller --strength)"
    for result in (first, second):
        assert result.exit_code == 2
        assert result.stderr == f"error: {message}\n"
        (line,) = result.stdout.splitlines()
        event = json.loads(line)
        assert (event["event"], event["message"], event["exit_code"]) == ("error", message, 2)


def test_values_the_base_held_are_carried_and_computed_ones_are_finite(tree):
    """The base's own -Inf (a mask) is copied as it is, in fp16 too; every patched value is
    finite; the report is strict JSON."""
    argv = [a.replace("{r}", tree) for a in merge("--strength", "100", "--output-dtype", "fp16")]
    result = run_cli(*argv)
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "warning: 1 tensor(s) written holding NaN or Inf, e.g. 'mask' (the base held it)\n"
    )
    merged = load_file(os.path.join(tree, "out", "m.safetensors"))
    base = load_file(os.path.join(tree, "base.safetensors"))
    assert torch.equal(merged["mask"], base["mask"].half())
    assert bool(torch.isfinite(merged[f"{Q}.weight"]).all())
    with open(os.path.join(tree, "out", "m.report.json")) as f:
        assert json.load(f)["tensors"]["mask"]["nonfinite"] == "the base held it"


def test_allow_nonfinite_writes_them_and_the_report_stays_strict_json(tree):
    """resize --allow-nonfinite keeps a NaN diff; its report's errors are null, not NaN."""
    save_file({f"{Q}.diff_b": torch.full((48,), math.nan)}, os.path.join(tree, "nan.safetensors"))
    out = os.path.join(tree, "out", "r.safetensors")
    result = run_cli(
        *resize("--allow-nonfinite", lora=os.path.join(tree, "nan.safetensors"))[:5],
        out,
        "--rank",
        "2",
        "--allow-nonfinite",
    )
    assert result.exit_code == 0, result.output
    assert bool(torch.isnan(load_file(out)[f"diffusion_model.{Q}.diff_b"]).all())

    def refuse(constant):
        raise ValueError(f"bare {constant} in the report")

    with open(os.path.join(tree, "out", "r.report.json")) as f:
        report = json.load(f, parse_constant=refuse)
    assert report["tensors"][f"{Q}.bias"]["rel_error"] is None


def test_a_blocked_merge_checks_each_block(tmp_path):
    """A tensor over --max-memory is merged a block of rows at a time: each block is checked
    as it is cast, and the refusal leaves nothing behind."""
    save_file({"big.weight": torch.zeros(4096, 2048)}, tmp_path / "base.safetensors")
    save_file(
        {"big.lora_up.weight": torch.ones(4096, 1), "big.lora_down.weight": torch.ones(1, 2048)},
        tmp_path / "lora.safetensors",
    )
    before = snapshot(str(tmp_path))
    result = run_cli(
        "merge", "--quiet", "--source-model", tmp_path / "base.safetensors", "--lora-model",
        tmp_path / "lora.safetensors", "--strength", "7e4", "--output-dtype", "fp16",
        "--max-memory", "64MiB", "--output", tmp_path / "m.safetensors",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.stderr == (
        f"error: tensor 'big.weight': would be written holding NaN or Inf as {FP16}; made from "
        f"{tmp_path}/base.safetensors + {tmp_path}/lora.safetensors at strength 70000 × scale 1 "
        f"(lower --strength or --alpha, or {WIDER})\n"
    )
    assert changes(before, snapshot(str(tmp_path))) == ([], [])
