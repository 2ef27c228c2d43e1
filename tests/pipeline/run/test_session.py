"""The session every command runs in: paths and device resolved up front, the work directory's
lock and owner, the report's path."""

import json
import os
from types import SimpleNamespace

import pytest

from loraforge.pipeline.errors import OutputError, WorkDirConflict, WorkDirLocked
from loraforge.pipeline.run import session as session_module
from loraforge.pipeline.run.cluster import TaskCall
from loraforge.pipeline.run.options import RunOptions
from loraforge.pipeline.run.session import Session


def open_session(tmp_path, command="extract", **run):
    return Session.open(
        command, RunOptions(device="cpu", **run), str(tmp_path / "out" / "lora"), "safetensors"
    )


def test_paths_are_resolved_before_any_work(tmp_path):
    session = open_session(tmp_path)
    assert session.output == str(tmp_path / "out" / "lora.safetensors")
    assert session.device == "cpu" and session.gpus is None
    assert session.work.path == str(tmp_path / "out" / "lora.safetensors.work")
    assert session.report_path == str(tmp_path / "out" / "lora.report.json")
    assert not os.path.exists(session.work.path)  # nothing is created until the run locks it


def test_explicit_work_dir_and_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    session = open_session(tmp_path, work_dir="w", report="r.json")
    assert session.work.path == str(tmp_path / "w")
    assert session.report_path == str(tmp_path / "r.json")


def test_an_output_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "out" / "lora.safetensors").mkdir(parents=True)
    with pytest.raises(OutputError) as caught:
        open_session(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path / 'out' / 'lora.safetensors'}: is a directory (give a file name for --output)"
    )


def test_a_work_directory_left_by_another_command_is_refused(tmp_path):
    session = open_session(tmp_path)
    os.makedirs(session.work.path)
    session.work.write_manifest({"command": "merge"})
    with pytest.raises(WorkDirConflict) as caught, session.locked():
        pass
    assert caught.value.exit_code == 3
    assert str(caught.value) == (
        f"{session.work.path}: work directory was left by loraforge merge, not extract "
        "(pass another --work-dir)"
    )
    assert not os.path.exists(os.path.join(session.work.path, "lock.json"))  # released


def test_locked_yields_the_previous_manifest_and_holds_the_lock(tmp_path):
    session = open_session(tmp_path)
    os.makedirs(session.work.path)
    session.work.write_manifest({"command": "extract", "kernel": {"rank": 8}})
    with session.locked() as previous:
        assert previous == {"command": "extract", "kernel": {"rank": 8}}
        with open(os.path.join(session.work.path, "lock.json")) as f:
            assert json.load(f)["pid"] == os.getpid()
        with pytest.raises(WorkDirLocked) as caught, open_session(tmp_path).locked():
            pass
        assert caught.value.exit_code == 3
    assert not os.path.exists(os.path.join(session.work.path, "lock.json"))


def test_events_and_report(tmp_path):
    events = []
    session = Session.open(
        "merge",
        RunOptions(device="cpu"),
        str(tmp_path / "m.safetensors"),
        "safetensors",
        lambda event, info: events.append((event, info)),
    )
    session.start(tensors=3, total_bytes=300, done=1, done_bytes=100, changes=["x changed"])
    assert events == [
        (
            "start",
            {
                "tensors": 3,
                "bytes": 300,
                "done": 1,
                "done_bytes": 100,
                "changes": ["x changed"],
                "work_dir": str(tmp_path / "m.safetensors.work"),
            },
        )
    ]
    session.save_report({"summary": {"kinds": {}}, "tensors": {}})
    with open(tmp_path / "m.report.json") as f:
        assert json.load(f) == {
            "summary": {"kinds": {}, "report": str(tmp_path / "m.report.json")},
            "tensors": {},
        }


def test_start_tasks_counts_what_is_not_pending_as_done(tmp_path):
    events = []
    session = Session.open(
        "extract",
        RunOptions(device="cpu"),
        str(tmp_path / "lora.safetensors"),
        "safetensors",
        lambda event, info: events.append((event, info)),
    )
    tasks = [SimpleNamespace(read_bytes=n) for n in (100, 200, 300)]
    session.start_tasks(tasks, tasks[1:2], ["x changed"])
    assert events == [
        (
            "start",
            {
                "tensors": 3,
                "bytes": 600,
                "done": 2,
                "done_bytes": 400,
                "changes": ["x changed"],
                "work_dir": str(tmp_path / "lora.safetensors.work"),
            },
        )
    ]


def test_crash_points_count_reused_tensors(tmp_path, monkeypatch):
    """LORAFORGE_CRASH_AT=compute:N counts every finished tensor, those a resumed run reuses
    included, as before the run layer computed for the commands."""
    points = []
    monkeypatch.setattr(session_module, "maybe_crash", lambda *point: points.append(point))
    session = open_session(tmp_path, workers=1)
    tasks = [SimpleNamespace(read_bytes=1) for _ in range(5)]
    session.start_tasks(tasks, tasks[3:], [])
    calls = [TaskCall(f"t{n}", int, (n,), tensor=f"t{n}") for n in (3, 4)]
    assert session.compute(calls) == {"t3": 3, "t4": 4}
    assert sorted(points) == [("compute", 4), ("compute", 5)]
    session.compute(calls[:1], progress=False)  # a recompute during the export: no point
    assert len(points) == 2
