"""Each command's options as the CLI parses them into the command's arguments: the command
function is replaced by one that records what it was called with, so these tests run no
command. Also each command's option list, and the exit codes of bad options."""

import os

import pytest
import typer

from loraforge.kernels import RankRule
from loraforge.pipeline.cli import convert, extract, merge, resize, verify
from loraforge.pipeline.extract.options import ExtractOptions, KernelOptions
from loraforge.pipeline.lora.config import LoraSpec, MergeConfig
from loraforge.pipeline.merge.options import MergeOptions
from loraforge.pipeline.resize.options import ResizeOptions
from loraforge.pipeline.run.options import RunOptions
from loraforge.pipeline.verify.options import VerifyOptions
from tests.helpers.cli import run_cli

REPORT = {"summary": {"kinds": {}, "status": {}, "seconds": 0.0, "files": []}, "tensors": {}}


@pytest.fixture
def calls(monkeypatch):
    """Replace each CLI module's command with a recorder; returns the recorded calls."""
    recorded = []

    def recorder(name):
        def command(**kwargs):
            kwargs.pop("progress")
            recorded.append((name, kwargs))
            summary = {**REPORT["summary"], "passed": True, "rel_error": 0.0, "worst": []}
            return {**REPORT, "command": name, "summary": summary}

        return command

    for module, name in ((extract, "extract"), (merge, "merge"), (resize, "resize")):
        monkeypatch.setattr(module, name, recorder(name))
    monkeypatch.setattr(verify, "verify", recorder("verify"))
    monkeypatch.setattr(convert, "convert", recorder("convert"))
    return recorded


def test_extract_options_become_extract_and_run_options(calls):
    result = run_cli(
        *("extract", "--source-model", "b", "--target-model", "f", "--output", "o"),
        *("--rank", "32,16", "--rank-mode", "energy", "--energy", "0.9", "--min-rank", "2"),
        *("--power-iterations", "2", "--svd-tol", "0.01", "--oversample", "8"),
        *("--output-dtype", "FP16", "--max-shard-size", "1GB", "--key-style", "kohya"),
        *("--lowrank-min-params", "0", "--workers", "3", "--max-memory", "1GiB"),
        *("--no-resume", "--no-keep-work", "--json", "--target-type", "pytorch"),
    )
    assert result.exit_code == 0, result.output
    assert calls == [
        (
            "extract",
            {
                "source_model": "b",
                "target_model": "f",
                "output": "o",
                "options": ExtractOptions(
                    kernel=KernelOptions(rank=32, oversample=8, n_iter=2, tol=0.01),
                    rank_rule=RankRule(mode="energy", rank=32, min_rank=2, energy=0.9),
                    ranks=(16, 32),
                    lowrank_min_params=0,
                    output_dtype="fp16",
                    max_shard_size=10**9,
                    key_style="kohya",
                ),
                "run": RunOptions(
                    workers=3, max_memory=2**30, resume=False, keep_work=False, json=True
                ),
                "source_type": "safetensors",
                "target_type": "pytorch",
            },
        )
    ]


def test_merge_options_and_its_loras(calls):
    result = run_cli(
        *("merge", "--source-model", "b", "--output", "m", "--alpha", "0.5"),
        *("--lora-model", "a.safetensors", "--strength", "0.8", "--lora-model", "c.pt"),
        *("--strength", "1.5"),
        *("--lora-type", "pytorch", "--output-dtype", "fp8_e4m3fn", "--strict"),
        *("--device", "cpu", "--gpus", "0", "--quiet"),
    )
    assert result.exit_code == 0, result.output
    ((name, kwargs),) = calls
    assert name == "merge"
    assert kwargs == {
        "source_model": "b",
        "loras": MergeConfig(
            loras=(
                LoraSpec(os.path.abspath("a.safetensors"), 0.8),
                LoraSpec(os.path.abspath("c.pt"), 1.5),
            )
        ),
        "output": "m",
        "options": MergeOptions(alpha=0.5, output_dtype="fp8_e4m3fn", strict=True),
        "run": RunOptions(device="cpu", gpus="0", quiet=True),
        "source_type": "safetensors",
        "lora_type": "pytorch",
    }


def test_resize_runs_on_the_cpu_and_needs_a_rank(calls):
    result = run_cli("resize", "--lora-model", "a", "--output", "s", "--rank", "8", "--quiet")
    assert result.exit_code == 0, result.output
    ((_, kwargs),) = calls
    assert kwargs["options"] == ResizeOptions(rank_rule=RankRule(rank=8), ranks=(8,))
    assert kwargs["run"] == RunOptions(device="cpu", quiet=True)
    missing = run_cli("resize", "--lora-model", "a", "--output", "s")
    assert missing.exit_code == 2
    assert missing.stderr == "error: Missing option '--rank'. (see root resize --help)\n"


def test_verify_reports_only_when_asked_and_runs_on_the_cpu(calls):
    result = run_cli(
        *("verify", "--source-model", "b", "--target-model", "f", "--lora-model", "a"),
        *("--max-error", "0.1", "--worst", "3", "--report", "r.json", "--quiet"),
    )
    assert result.exit_code == 0, result.output
    ((_, kwargs),) = calls
    assert kwargs["options"] == VerifyOptions(max_error=0.1, worst=3)
    assert kwargs["run"] == RunOptions(device="cpu", report="r.json", quiet=True)


def test_convert_takes_the_report_quiet_and_json_run_options(calls):
    result = run_cli("convert", "in.safetensors", "out", "--to", "peft", "--report", "r.json")
    assert result.exit_code == 0, result.output
    ((_, kwargs),) = calls
    assert kwargs == {
        "lora": "in.safetensors",
        "output": "out",
        "to": "peft",
        "base": None,
        "lora_type": None,
        "base_type": "safetensors",
        "max_shard_size": None,
        "run": RunOptions(report="r.json"),
    }


RUN_ALL = {
    "--device",
    "--workers",
    "--scheduler",
    "--gpus",
    "--max-memory",
    "--work-dir",
    "--resume",
    "--keep-work",
    "--report",
    "--quiet",
    "--json",
}
LORAS = {"--lora-model", "--strength", "--config", "--config-name", "--lora-type"}
OUTPUT = {
    "--rank",
    "--rank-mode",
    "--min-rank",
    "--energy",
    "--sv-ratio",
    "--sv-threshold",
    "--rank-budget",
    "--output-dtype",
    "--output-format",
    "--max-shard-size",
    "--key-style",
}
RUNTIME = {
    "--model_cls",
    "--task",
    "--model_path",
    "--config_json",
    "--transformer_path",
    "--transformer_2_path",
    "--dtype",
}
KERNEL = {
    "--svd",
    "--oversample",
    "--power-iterations",
    "--svd-tol",
    "--max-power-iterations",
    "--sketch-precision",
}
OPTIONS = {
    "extract": {
        "--source-model",
        "--target-model",
        "--output",
        "--source-type",
        "--target-type",
        "--diff-only",
        "--lowrank-min-params",
    }
    | OUTPUT
    | KERNEL
    | RUN_ALL,
    "merge": {
        "--source-model",
        "--output",
        "--alpha",
        "--source-type",
        "--output-format",
        "--output-dtype",
        "--max-shard-size",
        "--strict",
        "--allow-nonfinite",
    }
    | LORAS
    | RUN_ALL - {"--keep-work"},
    "resize": {"--output", "--base", "--base-type", "--allow-nonfinite"}
    | LORAS
    | OUTPUT
    | RUN_ALL - {"--device", "--scheduler", "--gpus"},
    "verify": {
        "--source-model",
        "--target-model",
        "--alpha",
        "--max-error",
        "--worst",
        "--source-type",
        "--target-type",
    }
    | LORAS
    | {"--workers", "--max-memory", "--report", "--quiet", "--json"},
    "convert": {"--to", "--base", "--base-type", "--lora-type", "--max-shard-size"}
    | {"--report", "--quiet", "--json"},
    "inspect": {"--base", "--lora-type", "--json"},
    "clean": set(),
    "infer": RUNTIME
    | {
        "--save_result_path",
        "--prompt",
        "--negative_prompt",
        "--image_path",
        "--seed",
        "--lora_path",
        "--lora_strength",
        "--save_frames",
    }
    | {"--device", "--report", "--quiet", "--json"},
    "serve": RUNTIME
    | {"--lora_dir", "--output_dir", "--host", "--port", "--max_queue_size"}
    | {"--device", "--quiet"},
}


def test_every_command_is_listed():
    from loraforge.pipeline.cli import app

    assert set(typer.main.get_command(app).commands) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_command_takes_exactly_its_options(name):
    from loraforge.pipeline.cli import app

    command = typer.main.get_command(app).commands[name]
    options = {
        opt
        for param in command.params
        for opt in param.opts
        if opt.startswith("--") and opt != "--help"
    }
    assert options == OPTIONS[name]
    assert run_cli(name, "--help").exit_code == 0


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ("--rank", "x"),
            "error: --rank 'x' is not an integer or a comma-separated list of integers\n",
        ),
        (
            ("--rank-mode", "ratio", "--energy", "0.9"),
            "error: --energy applies only to --rank-mode energy\n",
        ),
        (("--workers", "0"), None),
        (("--max-memory", "lots"), None),
        (("--svd", "qr"), None),
        (
            ("--power-iterations", "many"),
            "error: --power-iterations 'many' is not 'auto' or an integer\n",
        ),
    ],
)
def test_bad_options_exit_2_with_one_line_before_any_work(calls, args, line):
    result = run_cli(
        "extract", "--source-model", "b", "--target-model", "f", "--output", "o", *args
    )
    assert result.exit_code == 2
    assert calls == []
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    if line is not None:
        assert result.stderr == line


def test_infer_options_become_runtime_infer_and_run_options(monkeypatch):
    from loraforge.pipeline.cli import infer
    from loraforge.pipeline.infer.options import InferOptions
    from loraforge.pipeline.runtime.spec import RuntimeOptions

    recorded = []

    def command(**kwargs):
        kwargs.pop("progress")
        recorded.append(kwargs)
        return {"summary": {"phases": {}, "peak_rss_bytes": 0, "files": []}, "tensors": {}}

    monkeypatch.setattr(infer, "infer", command)
    result = run_cli(
        *("infer", "--model_cls", "wan2.2_moe_distill", "--task", "i2v", "--model_path", "m"),
        *("--config_json", "c.json", "--transformer_2_path", "low.safetensors", "--dtype", "fp16"),
        *("--prompt", "a cat", "--seed", "7", "--lora_path", "a,b", "--lora_path", "c"),
        *("--lora_strength", "0.5", "--image_path", "i.png", "--save_frames"),
        *("--save_result_path", "o.mp4", "--device", "cpu", "--quiet"),
    )
    assert result.exit_code == 0, result.output
    assert recorded == [
        {
            "runtime": RuntimeOptions(
                "wan2.2_moe_distill", "i2v", "m", "c.json", None, "low.safetensors", "fp16"
            ),
            "options": InferOptions(
                prompt="a cat",
                image_path="i.png",
                seed=7,
                lora_path=("a", "b", "c"),
                lora_strength=(0.5,),
                save_frames=True,
            ),
            "save_result_path": "o.mp4",
            "run": RunOptions(device="cpu", quiet=True),
        }
    ]
    bad = run_cli("infer", "--model_cls", "wan9", "--model_path", "m", "--save_result_path", "o")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: Invalid value for '--model_cls'")
    assert bad.stderr.count("\n") == 1
