"""``loraforge inspect`` from the command line: the human tables on stdout, ``--json`` as one
object, bad input as one line; it writes nothing."""

import json
import os

import pytest

from loraforge.pipeline.inspect.command import inspect_lora
from tests.helpers.checkpoints import make_base
from tests.helpers.cli import run_cli, run_process
from tests.helpers.namings import write_styled_lora


@pytest.fixture
def files(tmp_path):
    base, _ = make_base(str(tmp_path))
    return {"base": base, "lora": write_styled_lora(str(tmp_path), "lightx2v"), "dir": tmp_path}


def test_human_output(files):
    before = sorted(os.listdir(files["dir"]))
    result = run_cli("inspect", files["lora"], "--base", files["base"])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(files["dir"])) == before
    lines = result.stdout.splitlines()
    assert lines[:2] == [
        f"{files['lora']} (safetensors): lightx2v naming",
        "9 tensors (BF16 6, F32 3), 0.000 GB; 3 low-rank modules, 0 diffs",
    ]
    rows = [line.split("│")[1:-1] for line in lines if line.count("│") == 8]
    norms = [f"{m['norm']:.6g}" for m in inspect_lora(files["lora"])["modules"]]
    assert [[cell.strip() for cell in row] for row in rows] == [
        ["diffusion_model.blocks.0.attn.k", "lowrank", "48x32", "8", "1", "BF16,F32", norms[0]],
        ["diffusion_model.blocks.0.attn.q", "lowrank", "48x32", "4", "0.5", "BF16,F32", norms[1]],
        ["diffusion_model.blocks.0.ffn.0", "lowrank", "64x32", "4", "2", "BF16,F32", norms[2]],
    ]  # the norms' values are checked exactly in tests/pipeline/inspect
    assert lines[-1] == (
        f"base {files['base']}: 3 of its 8 tensors targeted; 0 LoRA keys target nothing, "
        "0 shape mismatches"
    )
    assert result.stderr == ""


def test_json_is_the_report(files):
    result = run_cli("inspect", files["lora"], "--json")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    report = json.loads(line)
    assert (report["naming"], report["ranks"], report["base"]) == (
        "lightx2v",
        {"4": 2, "8": 1},
        None,
    )


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["{dir}/none.safetensors"], 1, "{dir}/none.safetensors: LoRA not found"),
        (
            ["{base}"],
            1,
            "{base}: no LoRA keys recognised (freqs_index, blocks.0.attn.k.weight, "
            "blocks.0.attn.q.bias, blocks.0.attn.q.weight, blocks.0.ffn.0.weight) (expected "
            "names ending in .lora_up/.lora_down.weight, .lora_A/.lora_B(.weight), "
            ".lora_linear_layer.up/.down.weight, .alpha or .diff; is this a full checkpoint?)",
        ),
        (
            ["{lora}", "--base", "{dir}/gone"],
            1,
            "{dir}/gone: no such file or directory (check the path)",
        ),
        (
            ["{dir}/notes.txt"],
            1,
            "{dir}/notes.txt: a safetensors checkpoint must end with .safetensors or be a "
            "directory of shards (pass the right --*-type (pytorch for .pt/.pth/.bin))",
        ),
    ],
    ids=["missing", "full-checkpoint", "missing-base", "not-a-checkpoint"],
)
def test_bad_input_is_one_line(files, args, code, message):
    (files["dir"] / "notes.txt").write_text("hello")
    fill = {"dir": files["dir"], "base": files["base"], "lora": files["lora"]}
    result = run_cli("inspect", *[a.format(**fill) for a in args])
    assert result.exit_code == code
    assert result.stdout == ""
    assert result.stderr == f"error: {message.format(**fill)}\n"
    result = run_cli("inspect", *[a.format(**fill) for a in args], "--json")
    event = json.loads(result.stdout)
    assert (event["event"], event["message"]) == ("error", message.format(**fill))


def test_as_a_process(files):
    result = run_process("inspect", files["dir"] / "none.safetensors")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"error: {files['dir']}/none.safetensors: LoRA not found\n"


def test_help_lists_every_flag():
    result = run_cli("inspect", "--help")
    assert result.exit_code == 0, result.output
    for flag in ("PATH", "--base", "--lora-type", "--json"):
        assert flag in result.output, flag
    assert "--config-name" in run_cli("merge", "--help").output


def test_json_stays_strict_json_when_an_alpha_is_nan(tmp_path):
    """Python's json writes a NaN alpha as a bare ``NaN``, which JSON readers refuse: it is
    null in the output (the module is still listed)."""
    import torch
    from safetensors.torch import save_file

    save_file(
        {
            "diffusion_model.blocks.0.q.lora_up.weight": torch.ones(8, 2),
            "diffusion_model.blocks.0.q.lora_down.weight": torch.ones(2, 4),
            "diffusion_model.blocks.0.q.alpha": torch.tensor(float("nan")),
        },
        tmp_path / "nan.safetensors",
    )
    result = run_cli("inspect", tmp_path / "nan.safetensors", "--json")
    assert result.exit_code == 0, result.output
    assert "NaN" not in result.stdout
    (module,) = json.loads(result.stdout)["modules"]
    assert (module["module"], module["alpha"], module["scale"]) == (
        "diffusion_model.blocks.0.q",
        None,
        None,
    )
