"""Bad input to ``loraforge merge``: one line, exit code 1 (2 for usage), no traceback, nothing
at --output. Through typer's runner, and once as a real process."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from tests.helpers import run_cli
from tests.pipeline.test_merge import Q, make_base, pair, rand, save_lora


@pytest.fixture
def files(tmp_path):
    base, _ = make_base(tmp_path)
    lora = save_lora(tmp_path, "lora.safetensors", pair(Q, ".lora_up.weight", ".lora_down.weight"))
    return {
        "base": base,
        "lora": lora,
        "dir": tmp_path,
        "out": str(tmp_path / "out" / "m.safetensors"),
    }


def merge_cli(files, *args):
    return run_cli(
        "merge", "--source-model", files["base"], "--output", files["out"], "--quiet", *args
    )


def assert_one_line(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_nothing_written(files):
    out = files["out"]
    assert not os.path.exists(out) and not os.path.exists(
        out.replace(".safetensors", ".report.json")
    )


def write(files, name, tensors) -> str:
    path = str(files["dir"] / name)
    save_file(tensors, path)
    return path


def config(files, data) -> str:
    path = files["dir"] / "loras.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def test_missing_base(files):
    files["base"] = str(files["dir"] / "nope.safetensors")
    assert_one_line(merge_cli(files, "--lora-model", files["lora"]), 1, "nope.safetensors")
    assert_nothing_written(files)


def test_missing_lora(files):
    result = merge_cli(files, "--lora-model", str(files["dir"] / "gone.safetensors"))
    assert_one_line(result, 1, "gone.safetensors", "LoRA not found")
    assert_nothing_written(files)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--strength", "strong"], "--strength 'strong' is not a number"),
        (["--strength", "nan"], "--strength must be finite"),
        (["--strength", "1", "--strength", "2"], "2 --strength value(s) for 1 --lora-model(s)"),
        (["--alpha", "x"], "--alpha 'x' is not a number"),
        (["--output-dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--max-shard-size", "lots"], "cannot read size 'lots'"),
        (["--output-format", "pytorch", "--max-shard-size", "1GB"], "needs --output-format"),
    ],
)
def test_usage_errors(files, args, needle):
    assert_one_line(merge_cli(files, "--lora-model", files["lora"], *args), 2, needle)
    assert_nothing_written(files)


def test_no_lora_and_both_sources(files):
    assert_one_line(merge_cli(files), 2, "no LoRA given")
    both = config(files, {"lora_path": files["lora"]})
    assert_one_line(
        merge_cli(files, "--config", both, "--lora-model", files["lora"]), 2, "not both"
    )
    assert_nothing_written(files)


@pytest.mark.parametrize(
    "data, code, needle",
    [
        ("{not json", 2, "not a readable JSON file"),
        ({"lora_path": ["lora.safetensors"], "infer_steps": 4}, 2, "unknown field(s) infer_steps"),
        ({"lora_configs": [{"path": "lora.safetensors", "strength": "high"}]}, 2, "'strength'"),
        ({"lora_configs": [{"path": "lora.safetensors", "name": "high_noise"}]}, 2, "name"),
        ({"lora_configs": []}, 2, "names no LoRA"),
        ({"lora_path": ["lora.safetensors", "missing/x.safetensors"]}, 1, "missing/x.safetensors"),
    ],
    ids=["json", "unknown-field", "strength", "entry-field", "empty", "missing-file"],
)
def test_bad_configs(files, data, code, needle):
    path = config(files, data)
    line = assert_one_line(merge_cli(files, "--config", path), code, needle)
    assert path in line  # the config is named
    assert_nothing_written(files)


def test_not_a_lora(files):
    assert_one_line(merge_cli(files, "--lora-model", files["base"]), 1, "no LoRA keys recognised")
    assert_nothing_written(files)


def test_lora_for_another_model(files):
    other = write(
        files, "other.safetensors", pair(Q, ".lora_up.weight", ".lora_down.weight", inp=40)
    )
    line = assert_one_line(merge_cli(files, "--lora-model", other), 1, "none of its 2 keys")
    assert "shape mismatch" in line and "other.safetensors" in line
    assert_nothing_written(files)


def test_nonfinite_lora_is_refused_unless_allowed(files):
    tensors = pair(Q, ".lora_up.weight", ".lora_down.weight")
    tensors[f"{Q}.lora_down.weight"][1, 2] = float("nan")
    bad = write(files, "nan.safetensors", tensors)
    line = assert_one_line(merge_cli(files, "--lora-model", bad), 1, "NaN or Inf")
    assert "nan.safetensors" in line and f"{Q}.lora_down.weight" in line
    assert not os.path.exists(files["out"])
    result = merge_cli(files, "--lora-model", bad, "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert os.path.exists(files["out"])


def test_strict_refuses_unmatched_keys_which_are_otherwise_listed(files):
    tensors = {**pair(Q, ".lora_up.weight", ".lora_down.weight"), "blocks.7.x.diff": rand(3)}
    lora = write(files, "extra.safetensors", tensors)
    line = assert_one_line(merge_cli(files, "--lora-model", lora, "--strict"), 1, "--strict")
    assert "blocks.7.x.diff" in line
    assert_nothing_written(files)
    result = merge_cli(files, "--lora-model", lora)
    assert result.exit_code == 0
    warning = result.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: ")
    assert "1 of 3 keys not merged" in warning[0] and "'blocks.7.x.diff'" in warning[0]


def test_output_problems(files):
    os.makedirs(files["out"])
    assert_one_line(merge_cli(files, "--lora-model", files["lora"]), 1, "is a directory")
    os.rmdir(files["out"])
    files["out"] = files["base"]
    assert_one_line(merge_cli(files, "--lora-model", files["lora"]), 2, "overwrite an input")


def test_unreadable_loras(files):
    truncated = files["dir"] / "cut.safetensors"
    truncated.write_bytes(open(files["lora"], "rb").read()[:-10])
    assert_one_line(merge_cli(files, "--lora-model", str(truncated)), 1, "cut.safetensors")
    adapter = files["dir"] / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    assert_one_line(merge_cli(files, "--lora-model", str(adapter)), 1, "adapter_model")
    assert_nothing_written(files)


@pytest.mark.slow
def test_real_process_exit_codes(files):
    """As a subprocess: the exit code and the single line, then a successful run's files."""
    cmd = [sys.executable, "-m", "loraforge.pipeline.cli", "merge", "--source-model", files["base"]]
    cmd += ["--output", files["out"], "--quiet", "--lora-model", files["lora"]]
    bad = subprocess.run([*cmd, "--strength", "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    good = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert os.path.exists(files["out"]) and not os.path.exists(files["out"] + ".work")
