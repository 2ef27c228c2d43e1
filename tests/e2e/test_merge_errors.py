"""Bad input to ``loraforge merge``: one line, exit code 1 (2 for usage, 3 for a work directory
it cannot use), no traceback, nothing at --output. Through typer's runner, and once as a real
process."""

import json
import os

import pytest
from safetensors.torch import save_file

from tests.helpers.checkpoints import Q, lora_pair, make_base, rand, save_lora
from tests.helpers.cli import run_cli, run_process


@pytest.fixture
def files(tmp_path):
    base, _ = make_base(tmp_path)
    lora = save_lora(
        tmp_path, "lora.safetensors", lora_pair(Q, ".lora_up.weight", ".lora_down.weight")
    )
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


def assert_one_line(result, code: int, message: str) -> None:
    """Exit ``code`` with exactly ``error: message`` on stderr and nothing on stdout."""
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert result.stderr == f"error: {message}\n"


def assert_nothing_written(files):
    out = files["out"]
    assert not os.path.exists(out)
    assert not os.path.exists(out.replace(".safetensors", ".report.json"))


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
    assert_one_line(
        merge_cli(files, "--lora-model", files["lora"]),
        1,
        f"{files['base']}: no such file or directory (check the path)",
    )
    assert_nothing_written(files)


def test_missing_lora(files):
    gone = files["dir"] / "gone.safetensors"
    result = merge_cli(files, "--lora-model", str(gone))
    assert_one_line(result, 1, f"{gone}: LoRA not found (check --lora-model)")
    assert_nothing_written(files)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strength", "strong"], "--strength 'strong' is not a number"),
        (["--strength", "nan"], "--strength must be finite, got 'nan'"),
        (
            ["--strength", "1", "--strength", "2"],
            "2 --strength value(s) for 1 --lora-model(s) (give one --strength per "
            "--lora-model, in the same order, or none for 1.0)",
        ),
        (["--alpha", "x"], "--alpha 'x' is not a number"),
        (
            ["--output-dtype", "fp8"],
            "unknown dtype 'fp8'; valid: float32, fp32, float16, fp16, bfloat16, bf16, "
            "fp8_e4m3fn, float8_e4m3fn",
        ),
        (["--max-shard-size", "lots"], "cannot read size 'lots'; write e.g. 5GB, 500MB or 2GiB"),
        (
            ["--output-format", "pytorch", "--max-shard-size", "1GB"],
            "--max-shard-size needs --output-format safetensors",
        ),
    ],
)
def test_usage_errors(files, args, message):
    assert_one_line(merge_cli(files, "--lora-model", files["lora"], *args), 2, message)
    assert_nothing_written(files)


def test_no_lora_and_both_sources(files):
    assert_one_line(
        merge_cli(files), 2, "no LoRA given (pass --lora-model (repeatable) or --config)"
    )
    both = config(files, {"lora_path": files["lora"]})
    assert_one_line(
        merge_cli(files, "--config", both, "--lora-model", files["lora"]),
        2,
        "give the LoRAs with --config or with --lora-model, not both",
    )
    assert_nothing_written(files)


@pytest.mark.parametrize(
    "data, code, message",
    [
        (
            "{not json",
            2,
            "not a readable JSON file (Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1))",
        ),
        (
            {"lora_configs": [{"path": "lora.safetensors", "strenght": 1}], "infer_steps": 4},
            2,
            "lora_configs[0]: unknown field(s) strenght; valid: name, path, strength, alpha",
        ),
        (
            {"lora_configs": [{"path": "lora.safetensors", "strength": "high"}]},
            2,
            "lora_configs[0]: 'strength' must be a finite number, got 'high'",
        ),
        (
            {"lora_configs": [{"path": "lora.safetensors", "name": "high_noise"}]},
            2,
            "the LoRAs are named (high_noise): choose one with --config-name NAME",
        ),
        ({"lora_configs": []}, 2, "the config names no LoRA"),
        (
            {"lora_path": ["lora.safetensors", "missing/x.safetensors"]},
            1,
            "names a LoRA that does not exist: {dir}/missing/x.safetensors (fix the path; "
            "relative paths are read from the config's directory, then from the working "
            "directory)",
        ),
    ],
    ids=["json", "entry-typo", "strength", "named-entries", "empty", "missing-file"],
)
def test_bad_configs(files, data, code, message):
    path = config(files, data)
    result = merge_cli(files, "--config", path)
    assert_one_line(result, code, f"{path}: " + message.format(dir=files["dir"]))
    assert_nothing_written(files)


def test_not_a_lora(files):
    assert_one_line(
        merge_cli(files, "--lora-model", files["base"]),
        1,
        f"{files['base']}: no LoRA keys recognised (freqs_index, blocks.0.attn.k.weight, "
        "blocks.0.attn.q.bias, blocks.0.attn.q.weight, blocks.0.ffn.0.weight) (expected names "
        "ending in .lora_up/.lora_down.weight, .lora_A/.lora_B(.weight), "
        ".lora_linear_layer.up/.down.weight, .alpha or .diff; is this a full checkpoint?)",
    )
    assert_nothing_written(files)


def test_lora_for_another_model(files):
    other = write(
        files, "other.safetensors", lora_pair(Q, ".lora_up.weight", ".lora_down.weight", inp=40)
    )
    assert_one_line(
        merge_cli(files, "--lora-model", other),
        1,
        f"{other}: none of its 2 keys patches the base, e.g. "
        "'blocks.0.attn.q.lora_down.weight': shape mismatch: up@down is 48x40 but base is 48x32 "
        "(is this LoRA for another model?)",
    )
    assert_nothing_written(files)


def test_nonfinite_lora_is_refused_unless_allowed(files):
    tensors = lora_pair(Q, ".lora_up.weight", ".lora_down.weight")
    tensors[f"{Q}.lora_down.weight"][1, 2] = float("nan")
    bad = write(files, "nan.safetensors", tensors)
    assert_one_line(
        merge_cli(files, "--lora-model", bad),
        1,
        f"{bad}: tensor '{Q}.lora_down.weight': holds NaN or Inf (fix the LoRA, or pass "
        "--allow-nonfinite to merge it anyway)",
    )
    assert_nothing_written(files)
    result = merge_cli(files, "--lora-model", bad, "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert os.path.exists(files["out"])


def test_strict_refuses_unmatched_keys_which_are_otherwise_listed(files):
    tensors = {**lora_pair(Q, ".lora_up.weight", ".lora_down.weight"), "blocks.7.x.diff": rand(3)}
    lora = write(files, "extra.safetensors", tensors)
    assert_one_line(
        merge_cli(files, "--lora-model", lora, "--strict"),
        1,
        f"{lora}: 1 of its 3 keys would not be merged, e.g. 'blocks.7.x.diff': targets no base "
        "tensor (every key is listed in the report; without --strict they are skipped)",
    )
    # Refused before any work: no output, no work directory, but the report says why.
    assert sorted(os.listdir(files["dir"] / "out")) == ["m.report.json"]
    with open(files["dir"] / "out" / "m.report.json") as f:
        report = json.load(f)
    assert report["tensors"] == {} and report["summary"]["files"] == []
    assert report["summary"]["refused"].startswith(f"{lora}: 1 of its 3 keys would not be")
    assert report["summary"]["loras"][0]["unmatched"] == {
        "blocks.7.x.diff": "targets no base tensor"
    }
    os.unlink(files["dir"] / "out" / "m.report.json")
    result = merge_cli(files, "--lora-model", lora)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert result.stderr == (
        f"warning: {lora}: 1 tensor patched at strength 1; 1 of 3 keys not merged (listed in "
        "the report), e.g. 'blocks.7.x.diff': targets no base tensor\n"
    )


def test_output_problems(files):
    os.makedirs(files["out"])
    assert_one_line(
        merge_cli(files, "--lora-model", files["lora"]),
        1,
        f"{files['out']}: is a directory (give a file name for --output)",
    )
    os.rmdir(files["out"])
    files["out"] = files["base"]
    assert_one_line(
        merge_cli(files, "--lora-model", files["lora"]),
        2,
        f"{files['base']}: --output would overwrite the input --source-model {files['base']} "
        "(choose another --output)",
    )


def test_unreadable_loras(files):
    truncated = files["dir"] / "cut.safetensors"
    truncated.write_bytes(open(files["lora"], "rb").read()[:-10])
    assert_one_line(
        merge_cli(files, "--lora-model", str(truncated)),
        1,
        f"{truncated}: tensor '{Q}.lora_up.weight': data offsets [512, 1280] run past the end "
        "of the data (1270 bytes) (the file is truncated; re-download or re-save it)",
    )
    adapter = files["dir"] / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 4}')
    assert_one_line(
        merge_cli(files, "--lora-model", str(adapter)),
        1,
        f"{adapter}: PEFT adapter directory holds no adapter_model.safetensors or "
        "adapter_model.bin",
    )
    assert_nothing_written(files)


def test_work_directory_of_an_extraction_is_refused(files, pair_files):
    extracted = files["dir"] / "extracted" / "lora.safetensors"
    args = ["--source-model", pair_files[0], "--target-model", pair_files[1]]
    result = run_cli("extract", *args, "--output", extracted, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    work = f"{extracted}.work"
    before = sorted(os.listdir(work))
    assert_one_line(
        merge_cli(files, "--lora-model", files["lora"], "--work-dir", work),
        3,
        f"{work}: work directory was left by loraforge extract, not merge "
        "(pass another --work-dir)",
    )
    assert_nothing_written(files)
    assert sorted(os.listdir(work)) == before  # the extraction's intermediates are kept


@pytest.mark.slow
def test_real_process_exit_codes(files):
    """As a subprocess: the exit code and the single line, then a successful run's files."""
    args = ["merge", "--source-model", files["base"], "--output", files["out"], "--quiet"]
    args += ["--lora-model", files["lora"]]
    bad = run_process(*args, "--strength", "x", timeout=60)
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr == "error: --strength 'x' is not a number\n"
    good = run_process(*args, timeout=60)
    assert (good.returncode, good.stdout, good.stderr) == (0, "", ""), good.stderr
    assert os.path.exists(files["out"]) and not os.path.exists(files["out"] + ".work")
    assert os.path.exists(files["out"].replace(".safetensors", ".report.json"))
