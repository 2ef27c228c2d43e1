"""``--json``: every stdout line is one JSON object, with the documented events and keys."""

from __future__ import annotations

import json
import os

from tests.helpers.checkpoints import MIN_PARAMS
from tests.helpers.cli import run_cli
from tests.helpers.reference import read_report

EXTRACTED = [  # the tensors of pair_tensors() in both models
    "blocks.0.attn.q.bias",
    "blocks.0.attn.q.weight",
    "blocks.0.ffn.0.bias",
    "blocks.0.ffn.0.weight",
    "blocks.0.modulation",
    "blocks.0.norm.weight",
    "head.weight",
    "patch_embedding.weight",
]

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


def test_extract_json_events(pair_files, tmp_path, monkeypatch):
    output = tmp_path / "lora.safetensors"
    args = ["extract", "--source-model", pair_files[0], "--target-model", pair_files[1]]
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
    assert sorted(e["key"] for e in tensors) == EXTRACTED  # in completion order
    assert (log[0]["done"], log[0]["done_bytes"], log[0]["changes"]) == (0, 0, [])
    assert log[0]["work_dir"] == str(tmp_path / "lora.safetensors.work")
    (cluster,) = [e for e in log if e["event"] == "cluster"]
    assert cluster["dashboard"] is None  # the embedded in-process cluster
    summary = log[-1]
    report = str(tmp_path / "lora.report.json")
    assert summary["files"] == [str(output)] and summary["output"] == str(output)
    assert summary["report"] == report
    assert read_report(report)["summary"]["report"] == report
    assert summary["status"] == {"computed": 8}
    assert (summary["computed"], summary["reused"]) == (8, 0)
    assert summary["kinds"] == {"diff": 5, "lowrank": 2, "skipped": 1}

    # resumed: nothing to compute, the start event says so; a relative --report is reported
    # by its absolute path
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args, "--json", "--quiet", "--report", "again.json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    log = events(result)
    assert [e["event"] for e in log] == ["start", "write", "summary"]
    assert (log[0]["tensors"], log[0]["done"]) == (8, 8)
    assert log[0]["done_bytes"] == log[0]["bytes"]
    assert (log[-1]["computed"], log[-1]["reused"]) == (0, 8)
    assert log[-1]["status"] == {"reused": 8}
    assert log[-1]["report"] == str(tmp_path / "again.json")
    summary = {k: v for k, v in log[-1].items() if k not in COMMON}
    assert read_report(tmp_path / "again.json")["summary"] == summary


def test_merge_json_events(pair_files, tmp_path):
    lora = tmp_path / "lora.safetensors"
    args = ["extract", "--source-model", pair_files[0], "--target-model", pair_files[1]]
    extracted = run_cli(*args, "--output", lora, "--device", "cpu", "--quiet")
    assert extracted.exit_code == 0, extracted.output
    result = run_cli(
        "merge",
        "--source-model",
        pair_files[0],
        "--lora-model",
        lora,
        "--output",
        tmp_path / "merged.safetensors",
        "--device",
        "cpu",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    log = events(result)
    names = [e["event"] for e in log]
    assert names == ["loras", "start", "cluster", *["tensor"] * 9, "write", "summary"]
    assert {e["command"] for e in log} == {"merge"}
    assert log[1]["tensors"] == 9  # every base tensor, the one only in the base included
    tensors = [e for e in log if e["event"] == "tensor"]
    assert sorted(e["key"] for e in tensors) == sorted([*EXTRACTED, "only_in_base.weight"])
    (entry,) = log[0]["loras"]
    assert (entry["file"], entry["keys"], entry["patches"], entry["unmatched"]) == (
        str(lora),
        10,  # default --lowrank-min-params: seven diffs, three of them 2-D weights as pairs
        7,
        {},
    )
    summary = log[-1]
    assert summary["kinds"] == {"copied": 2, "merged": 7}
    assert summary["files"] == [str(tmp_path / "merged.safetensors")]
    assert summary["report"] == str(tmp_path / "merged.report.json")
    assert os.path.isfile(summary["report"])


def test_errors_are_json_events_too(pair_files, tmp_path):
    args = ["extract", "--source-model", pair_files[0], "--target-model", tmp_path / "missing"]
    result = run_cli(*args, "--output", tmp_path / "lora.safetensors", "--json")
    assert result.exit_code == 1
    (error,) = events(result)
    message = f"{tmp_path / 'missing'}: no such file or directory (check the path)"
    assert (error["event"], error["command"], error["exit_code"]) == ("error", "extract", 1)
    assert error["message"] == message
    assert result.stderr == f"error: {message}\n"
