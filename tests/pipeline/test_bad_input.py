"""Every bad input gets one clear line, the right exit code, no traceback, and no output."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import pair_tensors
from tests.helpers import run_cli
from tests.pipeline.test_reader import Payload, corrupt


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
    leftovers = os.listdir(output.parent) if output.parent.exists() else []
    assert not [n for n in leftovers if n.endswith((".safetensors", ".pt", ".partial"))]
    return result


def one_line(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_source(tmp_path, pair):
    result = run_extract(tmp_path, str(tmp_path / "missing.safetensors"), pair[1])
    one_line(result, 1, "missing.safetensors", "no such file")


def test_wrong_extension_for_type(tmp_path, pair):
    result = run_extract(tmp_path, pair[0], pair[1], "--source-type", "pytorch")
    one_line(result, 1, "base.safetensors", ".pt, .pth or .bin")


def test_directory_without_safetensors(tmp_path, pair):
    (tmp_path / "empty").mkdir()
    result = run_extract(tmp_path, str(tmp_path / "empty"), pair[1])
    one_line(result, 1, "empty", "no .safetensors files")


@pytest.mark.parametrize(
    "how,message",
    [
        ("header length", "bad header length"),
        ("json", "not valid JSON"),
        ("truncated", "past the end"),
    ],
)
def test_corrupt_target(tmp_path, pair, how, message):
    corrupt(pair[1], how)
    result = run_extract(tmp_path, pair[0], pair[1])
    one_line(result, 1, "target.safetensors", message)


def test_pickle_with_code(tmp_path, pair):
    torch.save({"w": torch.zeros(2), "x": Payload()}, tmp_path / "evil.pt")
    result = run_extract(tmp_path, str(tmp_path / "evil.pt"), pair[1], "--source-type", "pytorch")
    one_line(result, 1, "evil.pt", "refusing a pickle")


@pytest.mark.parametrize(
    "args,fragment",
    [
        (("--rank", "0"), "--rank must be >= 1"),
        (("--output-dtype", "int8"), "unknown dtype"),
        (("--max-shard-size", "lots"), "cannot read size"),
    ],
)
def test_usage_errors_exit_2(tmp_path, pair, args, fragment):
    one_line(run_extract(tmp_path, *pair, *args), 2, fragment)


def test_unwritable_output_location(tmp_path, pair):
    (tmp_path / "a_file").write_text("")
    result = run_cli(
        "extract",
        "--source-model",
        pair[0],
        "--target-model",
        pair[1],
        "--output",
        tmp_path / "a_file" / "lora.safetensors",
        "--quiet",
    )
    one_line(result, 1, "a_file", "cannot create the output directory")


def test_nan_in_a_delta_names_file_and_key(tmp_path):
    base, tuned = pair_tensors()
    tuned["head.weight"][0, 0] = float("nan")
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    result = run_extract(
        tmp_path, str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors")
    )
    one_line(result, 1, "tuned.safetensors", "head.weight", "NaN or Inf")


def test_real_process_exit_code_and_traceback_switch(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "loraforge.pipeline.cli",
        "extract",
        "--source-model",
        str(tmp_path / "nope.safetensors"),
        "--target-model",
        str(tmp_path / "x"),
        "--output",
        str(tmp_path / "o.safetensors"),
    ]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 1
    assert quiet.stderr.strip().count("\n") == 0 and "nope.safetensors" in quiet.stderr
    loud = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LORAFORGE_TRACEBACK": "1"},
    )
    assert loud.returncode == 1 and "Traceback" in loud.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_failing_task_in_a_real_process_prints_one_line(tmp_path):
    base, tuned = pair_tensors()
    tuned["head.weight"][0, 0] = float("inf")
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    cmd = [
        sys.executable,
        "-m",
        "loraforge.pipeline.cli",
        "extract",
        "--quiet",
        "--source-model",
        str(tmp_path / "base.safetensors"),
        "--target-model",
        str(tmp_path / "tuned.safetensors"),
        "--output",
        str(tmp_path / "o.safetensors"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'tuned.safetensors'}: tensor 'head.weight': holds NaN or Inf, so "
        "the delta is not finite (fix or re-save the checkpoint)"
    ]
    assert not (tmp_path / "o.safetensors").exists()


def test_full_disk_is_one_line(tmp_path, pair, monkeypatch):
    import errno

    from loraforge.pipeline import workdir

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "work"))

    monkeypatch.setattr(workdir.WorkDir, "save", no_space)
    result = run_extract(tmp_path, *pair)
    one_line(result, 1, "No space left on device", "rerun to resume")
