"""``--json``: every stdout line is one JSON object, with the documented events and keys."""

from __future__ import annotations

import json
import os

from tests.conftest import MIN_PARAMS
from tests.helpers import run_cli

COMMON = {"event", "command", "time"}
KEYS = {
    "start": {"tensors", "bytes", "done", "done_bytes", "changes", "work_dir"},
    "cluster": {"dashboard"},
    "tensor": {"key", "bytes", "done", "tensors"},
    "write": {"tensors"},
    "summary": {"kinds", "status", "seconds", "files", "output", "computed", "reused", "report"},
    "loras": {"loras"},
    "error": {"message", "exit_code"},
}


def events(result) -> list[dict]:
    lines = result.stdout.splitlines()
    assert lines, result.output
    parsed = [json.loads(line) for line in lines]  # every line parses
    for event in parsed:
        assert COMMON <= event.keys(), event
        assert KEYS[event["event"]] <= event.keys(), event
    return parsed


def test_extract_json_events(pair, tmp_path):
    output = tmp_path / "lora.safetensors"
    args = ["extract", "--source-model", pair[0], "--target-model", pair[1]]
    args += ["--output", output, "--lowrank-min-params", MIN_PARAMS, "--device", "cpu"]
    result = run_cli(*args, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # no bar, no table
    log = events(result)
    names = [e["event"] for e in log]
    assert names[0] == "start" and names[-2:] == ["write", "summary"]
    assert {e["command"] for e in log} == {"extract"}
    tensors = [e for e in log if e["event"] == "tensor"]
    assert len(tensors) == log[0]["tensors"] == 8
    assert [e["done"] for e in tensors] == list(range(1, 9))
    (cluster,) = [e for e in log if e["event"] == "cluster"]
    assert cluster["dashboard"] is None  # the embedded in-process cluster
    summary = log[-1]
    assert summary["files"] == [str(output)] and os.path.exists(summary["report"])
    assert summary["status"] == {"computed": 8}

    # resumed: nothing to compute, the start event says so
    log = events(run_cli(*args, "--json", "--quiet"))
    assert [e["event"] for e in log] == ["start", "write", "summary"]
    assert log[0]["done"] == log[0]["tensors"] and log[-1]["reused"] == 8


def test_merge_json_events(pair, tmp_path):
    lora = tmp_path / "lora.safetensors"
    args = ["extract", "--source-model", pair[0], "--target-model", pair[1]]
    assert run_cli(*args, "--output", lora, "--device", "cpu", "--quiet").exit_code == 0
    result = run_cli(
        "merge",
        "--source-model",
        pair[0],
        "--lora-model",
        lora,
        "--output",
        tmp_path / "merged.safetensors",
        "--device",
        "cpu",
        "--json",
    )
    assert result.exit_code == 0, result.output
    log = events(result)
    names = [e["event"] for e in log]
    assert names[:2] == ["loras", "start"] and names[-2:] == ["write", "summary"]
    assert names.count("tensor") == log[1]["tensors"]
    assert log[0]["loras"][0]["patches"] > 0


def test_errors_are_json_events_too(pair, tmp_path):
    args = ["extract", "--source-model", pair[0], "--target-model", tmp_path / "missing"]
    result = run_cli(*args, "--output", tmp_path / "lora.safetensors", "--json")
    assert result.exit_code == 1
    (error,) = events(result)
    assert error["event"] == "error" and error["exit_code"] == 1
    assert result.stderr.splitlines() == [f"error: {error['message']}"]
