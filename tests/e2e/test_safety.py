"""What docs/safety.md's "Safety" section promises beyond the bad-input matrix: loud warnings,
a stopped merge that says where it left its temporaries, and outputs that appear together."""

import errno
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from loraforge.pipeline.export import write as export_write
from loraforge.pipeline.merge import command as merge_command
from loraforge.pipeline.merge.task import run_merge_task
from tests.helpers.checkpoints import MIN_PARAMS, Q, lora_pair, make_base, pair_tensors, save_lora
from tests.helpers.cli import run_cli


def test_tensors_left_out_of_the_lora_are_warnings_even_when_quiet(tmp_path):
    base, target = pair_tensors()
    base["blocks.0.ffn.2.weight"], target["blocks.0.ffn.2.weight"] = (
        torch.zeros(4, 4),
        torch.ones(8, 4),
    )
    base["blocks.0.scale_shift_table"] = torch.zeros(1, 6, 8)
    target["blocks.0.scale_shift_table"] = torch.ones(1, 6, 8)
    save_file(base, tmp_path / "b.safetensors")
    save_file(target, tmp_path / "t.safetensors")
    out = tmp_path / "lora.safetensors"
    args = [
        "--source-model",
        tmp_path / "b.safetensors",
        "--target-model",
        tmp_path / "t.safetensors",
    ]
    result = run_cli(
        "extract", *args, "--output", out, "--lowrank-min-params", MIN_PARAMS, "--quiet"
    )
    assert result.exit_code == 0, result.output
    warnings = [
        "1 tensor not in the LoRA because the shape differs between the models, e.g. "
        "'blocks.0.ffn.2.weight': shape mismatch: [4, 4] vs [8, 4]",
        "1 tensor changed but not in the LoRA, e.g. "
        "'blocks.0.scale_shift_table': no LightX2V name for this suffix (only .weight, .bias, "
        ".modulation)",
    ]
    assert result.stderr == "".join(f"warning: {w}\n" for w in warnings)
    with open(tmp_path / "lora.report.json") as f:
        assert json.load(f)["summary"]["warnings"] == warnings


def merge_files(tmp_path):
    base, _ = make_base(tmp_path)
    lora = save_lora(
        tmp_path, "lora.safetensors", lora_pair(Q, ".lora_up.weight", ".lora_down.weight")
    )
    out = tmp_path / "out" / "m.safetensors"
    return ["merge", "--source-model", base, "--lora-model", lora, "--output", out, "--quiet"], out


def interrupting(exception: BaseException):
    def task(merge_task, *args, **kwargs):
        if merge_task.key == "patch_embedding.weight":
            raise exception
        return run_merge_task(merge_task, *args, **kwargs)

    return task


@pytest.mark.parametrize(
    "exception, code, line",
    [
        (
            KeyboardInterrupt(),
            130,
            "interrupted; finished tensors are kept in the work directory (rerun the same "
            "command to resume)",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device"),
            1,
            "No space left on device (free space or pick another --output / --work-dir; "
            "finished tensors are kept, rerun to resume)",
        ),
    ],
    ids=["interrupt", "disk-full"],
)
def test_a_stopped_merge_says_where_its_temporaries_are(
    tmp_path, monkeypatch, exception, code, line
):
    args, out = merge_files(tmp_path)
    monkeypatch.setattr(merge_command, "run_merge_task", interrupting(exception))
    result = run_cli(*args, "--workers", "1")
    work, partial = f"{out}.work", out.parent / ".m.safetensors.partial"
    assert result.exit_code == code
    assert result.stderr == (
        f"note: kept to resume: {partial}, {work}; rerun the same command to finish, or "
        f"`loraforge clean {work}` to remove them\nerror: {line}\n"
    )
    assert sorted(os.listdir(out.parent)) == [".m.safetensors.partial", "m.safetensors.work"]
    monkeypatch.undo()
    cleaned = run_cli("clean", work)
    assert cleaned.exit_code == 0, cleaned.output
    assert cleaned.stderr.splitlines()[0] == (
        f"removed the temporary output {partial} left to resume"
    )
    assert os.listdir(out.parent) == []


def test_a_failing_write_leaves_the_old_output_and_report_untouched(
    tmp_path, pair_files, monkeypatch
):
    out = tmp_path / "lora.safetensors"
    args = ["extract", "--source-model", pair_files[0], "--target-model", pair_files[1]]
    args += ["--output", out, "--lowrank-min-params", MIN_PARAMS, "--quiet"]
    assert run_cli(*args).exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_write, "_write", full_disk)  # after the outputs are opened
    failed = run_cli(*args, "--rank", "4")
    assert failed.exit_code == 1
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # old LoRA and report intact, no temporary left
    assert sorted(before) == ["lora.report.json", "lora.safetensors"]


@pytest.mark.parametrize("style", ["lightx2v", "peft"])
def test_a_refused_run_creates_no_directory(pair_files, tmp_path, style):
    """The output's directories are made when writing starts, not by the checks before: a run
    refused for its input leaves nothing behind, a PEFT adapter directory included."""
    output = tmp_path / "new" / "deeper" / "lora"
    result = run_cli(
        *("extract", "--source-model", pair_files[0], "--target-model", tmp_path / "missing"),
        *("--output", output, "--key-style", style, "--rank", "2,4", "--quiet"),
    )
    assert result.exit_code == 1, result.output
    assert list(tmp_path.iterdir()) == []


def test_an_output_directory_that_does_not_exist_yet_is_made(pair_files, tmp_path):
    output = tmp_path / "new" / "deeper" / "lora.safetensors"
    result = run_cli(
        *("extract", "--source-model", pair_files[0], "--target-model", pair_files[1]),
        *("--output", output, "--report", tmp_path / "reports" / "r.json", "--quiet"),
    )
    assert result.exit_code == 0, result.output
    assert output.is_file() and (tmp_path / "reports" / "r.json").is_file()
