"""Every bad input gets one clear line, the right exit code, no traceback, and no output."""

import errno
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from loraforge.pipeline import workdir
from tests.helpers.checkpoints import Payload, corrupt, pair_tensors
from tests.helpers.cli import run_cli, run_process


def run_extract(tmp_path, source, target, *extra):
    output = tmp_path / "out" / "lora.safetensors"
    result = run_cli(
        "extract",
        "--source-model",
        source,
        "--target-model",
        target,
        "--output",
        output,
        "--quiet",
        *extra,
    )
    # No output file, partial or report: at most the work directory of finished tensors.
    leftovers = os.listdir(output.parent) if output.parent.exists() else []
    assert set(leftovers) <= {"lora.safetensors.work"}, leftovers
    return result


def one_line(result, code: int, message: str) -> None:
    """Exit ``code`` with exactly ``error: message`` on stderr and nothing on stdout."""
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert result.stderr == f"error: {message}\n"


def test_missing_source(tmp_path, pair_files):
    missing = tmp_path / "missing.safetensors"
    result = run_extract(tmp_path, str(missing), pair_files[1])
    one_line(result, 1, f"{missing}: no such file or directory (check the path)")


def test_wrong_extension_for_type(tmp_path, pair_files):
    result = run_extract(tmp_path, *pair_files, "--source-type", "pytorch")
    one_line(
        result,
        1,
        f"{pair_files[0]}: a pytorch checkpoint must be a .pt, .pth or .bin file "
        "(pass the right --*-type (safetensors for .safetensors files))",
    )


def test_directory_without_safetensors(tmp_path, pair_files):
    (tmp_path / "empty").mkdir()
    result = run_extract(tmp_path, str(tmp_path / "empty"), pair_files[1])
    one_line(
        result,
        1,
        f"{tmp_path / 'empty'}: directory holds no .safetensors files "
        "(point at the checkpoint file or its shard directory)",
    )


@pytest.mark.parametrize(
    "how,message",
    [
        (
            "header length",
            "bad header length {double} for a file of {size} bytes (truncated or not "
            "safetensors) (re-download or re-save the checkpoint)",
        ),
        (
            "json",
            "header is not valid JSON (Expecting property name enclosed in double quotes) "
            "(the file is corrupt; re-save it)",
        ),
        (
            "truncated",
            "tensor 'blocks.0.attn.q.bias': data offsets [0, 192] run past the end of the data "
            "(4 bytes) (the file is truncated; re-download or re-save it)",
        ),
    ],
)
def test_corrupt_target(tmp_path, pair_files, how, message):
    damaged = tmp_path / "target.safetensors"
    shutil.copyfile(pair_files[1], damaged)  # the shared pair stays intact
    size = os.path.getsize(damaged)
    corrupt(damaged, how)
    result = run_extract(tmp_path, pair_files[0], str(damaged))
    one_line(result, 1, f"{damaged}: " + message.format(double=2 * size, size=size))


def test_pickle_with_code(tmp_path, pair_files):
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Payload()}, evil)
    result = run_extract(tmp_path, str(evil), pair_files[1], "--source-type", "pytorch")
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    # The middle is torch's own explanation, which varies between torch versions.
    line = result.stderr.removesuffix("\n")
    assert "\n" not in line and "pickle code ran" not in result.output
    assert line.startswith(f"error: {evil}: refusing a pickle that needs code to load (")
    assert line.endswith(") (convert it to safetensors in a trusted environment)")


@pytest.mark.parametrize(
    "args,message",
    [
        (("--rank", "0"), "--rank must be >= 1, got 0"),
        (
            ("--output-dtype", "int8"),
            "unknown dtype 'int8'; valid: float32, fp32, float16, fp16, bfloat16, bf16",
        ),
        (("--max-shard-size", "lots"), "cannot read size 'lots'; write e.g. 5GB, 500MB or 2GiB"),
    ],
)
def test_usage_errors_exit_2(tmp_path, pair_files, args, message):
    one_line(run_extract(tmp_path, *pair_files, *args), 2, message)


def test_unwritable_output_location(tmp_path, pair_files):
    (tmp_path / "a_file").write_text("")
    result = run_cli(
        "extract",
        "--source-model",
        pair_files[0],
        "--target-model",
        pair_files[1],
        "--output",
        tmp_path / "a_file" / "lora.safetensors",
        "--quiet",
    )
    one_line(
        result,
        1,
        f"{tmp_path / 'a_file'}: cannot create the output directory (File exists) "
        "(choose a writable --output location)",
    )
    assert (tmp_path / "a_file").read_text() == ""


NOT_FINITE = (
    "tensor 'head.weight': holds NaN or Inf, so the delta is not finite "
    "(fix or re-save the checkpoint)"
)


def test_nan_in_a_delta_names_file_and_key(tmp_path):
    base, tuned = pair_tensors()
    tuned["head.weight"][0, 0] = float("nan")
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    result = run_extract(
        tmp_path, str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    )
    one_line(result, 1, f"{tmp_path / 'tuned.safetensors'}: {NOT_FINITE}")


def test_real_process_exit_code_and_traceback_switch(tmp_path):
    args = ["extract", "--source-model", tmp_path / "nope.safetensors"]
    args += ["--target-model", tmp_path / "x", "--output", tmp_path / "o.safetensors"]
    line = f"error: {tmp_path / 'nope.safetensors'}: no such file or directory (check the path)\n"
    quiet = run_process(*args, timeout=120)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (1, "", line)
    loud = run_process(*args, env={"LORAFORGE_TRACEBACK": "1"}, timeout=120)
    assert loud.returncode == 1
    assert loud.stderr.startswith("Traceback (most recent call last):\n")
    assert loud.stderr.endswith(line)
    assert not (tmp_path / "o.safetensors").exists()


def test_failing_task_in_a_real_process_prints_one_line(tmp_path):
    base, tuned = pair_tensors()
    tuned["head.weight"][0, 0] = float("inf")
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    done = run_process(
        "extract",
        "--quiet",
        "--source-model",
        tmp_path / "base.safetensors",
        "--target-model",
        tmp_path / "tuned.safetensors",
        "--output",
        tmp_path / "o.safetensors",
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"error: {tmp_path / 'tuned.safetensors'}: {NOT_FINITE}\n"
    assert not (tmp_path / "o.safetensors").exists()


def test_full_disk_is_one_line(tmp_path, pair_files, monkeypatch):
    work = tmp_path / "out" / "lora.safetensors.work"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(work))

    monkeypatch.setattr(workdir.WorkDir, "save", no_space)
    result = run_extract(tmp_path, *pair_files)
    one_line(
        result,
        1,
        f"{work}: No space left on device (free space or pick another --output / --work-dir; "
        "finished tensors are kept, rerun to resume)",
    )


def test_output_naming_an_input_is_refused_and_the_input_kept(tmp_path, pair_files):
    target = tmp_path / "target.safetensors"
    shutil.copy(pair_files[1], target)
    before = target.read_bytes()
    result = run_cli(
        "extract",
        "--source-model",
        pair_files[0],
        "--target-model",
        target,
        "--output",
        target,
        "--quiet",
    )
    one_line(
        result,
        2,
        f"{target}: --output would overwrite the input --target-model {target} "
        "(choose another --output)",
    )
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["target.safetensors"]
