"""Completion markers live in a log per process: lines apply in the order they were written
whichever log holds them, a torn line costs only its own tensor, and an older loraforge's
marker files still count."""

import json
import os

import pytest

from loraforge.pipeline.workdir import WorkDir, markers
from loraforge.pipeline.workdir.markers import close_logs, log_name, read_all


@pytest.fixture
def work(tmp_path):
    work = WorkDir(str(tmp_path / "w"))
    work.create()
    yield work
    close_logs()


def test_a_marker_is_read_back_and_a_withdrawal_drops_it(work):
    work.write_marker("a.weight", {"crc": 7, "kind": "merged"})
    work.write_marker("b.weight", {"crc": 8})
    work.discard("a.weight")
    assert work.markers() == {"b.weight": {"key": "b.weight", "crc": 8}}
    assert work.read_marker("a.weight") is None
    assert os.listdir(work.done) == [log_name()]  # one file, however many tensors


def test_lines_apply_in_the_order_written_across_the_logs_of_several_processes(work):
    """Another process's log (another host, say) sorts before this one by name, but its lines
    were written later: its withdrawal and its new marker win."""
    work.write_marker("a.weight", {"crc": 1})
    work.write_marker("b.weight", {"crc": 2})
    later = os.path.join(work.done, "markers-aaa-1.jsonl")
    with open(later, "w") as f:
        at = 2**62
        f.write(json.dumps({"key": "a.weight", "removed": True, "at": at}) + "\n")
        f.write(json.dumps({"key": "b.weight", "crc": 3, "at": at + 1}) + "\n")
    assert work.markers() == {"b.weight": {"key": "b.weight", "crc": 3}}


def test_a_torn_last_line_costs_only_its_tensor_and_the_next_line_starts_clean(work):
    work.write_marker("a.weight", {"crc": 1})
    close_logs()  # as a killed process leaves it, mid-line
    with open(os.path.join(work.done, log_name()), "a") as f:
        f.write('{"key": "b.weight", "cr')
    work.write_marker("c.weight", {"crc": 3})  # the same pid again: its log, reopened
    assert sorted(work.markers()) == ["a.weight", "c.weight"]


def test_an_older_loraforges_marker_files_count_as_the_oldest_lines(work):
    for key, crc in (("a.weight", 1), ("b.weight", 2)):
        with open(os.path.join(work.done, f"{key}.json"), "w") as f:
            json.dump({"key": key, "crc": crc}, f)
    with open(os.path.join(work.done, "c.weight.json"), "w") as f:
        json.dump({"key": "other", "crc": 3}, f)  # names another key: not a marker
    work.discard("a.weight")  # its file goes too
    assert work.markers() == {"b.weight": {"key": "b.weight", "crc": 2}}
    assert not os.path.exists(os.path.join(work.done, "a.weight.json"))


def test_a_work_directory_cleared_and_made_again_gets_a_new_log(work):
    work.write_marker("a.weight", {"crc": 1})
    work.clear()
    assert not os.path.exists(work.done)
    work.create()
    work.write_marker("b.weight", {"crc": 2})  # not into the deleted file still open
    assert read_all(work.done) == {"b.weight": {"key": "b.weight", "crc": 2}}


def open_logs() -> list[str]:
    """The marker logs this process has open (``/proc/self/fd``)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used
            pass
    return sorted(link for link in links if os.path.basename(link).startswith("markers-"))


def test_a_finished_run_keeps_no_log_open(tmp_path):
    """A long-lived process (a notebook, a server) running merge after merge holds no file
    descriptor per work directory it used."""
    for i in range(3):
        work = WorkDir(str(tmp_path / f"w{i}"))
        work.create()
        work.write_marker("a.weight", {"crc": i})
        work.close_logs()
    assert open_logs() == []
    work.write_marker("b.weight", {"crc": 9})  # reopened for its next line
    assert open_logs() == [os.path.join(work.done, log_name())]
    assert sorted(work.markers()) == ["a.weight", "b.weight"]


def test_the_logs_count_as_loraforges_and_go_with_the_directory(work):
    work.write_marker("a.weight", {"crc": 1})
    assert work.remove() == []
    assert not os.path.exists(work.path)
    assert markers.read_all(work.done) == {}
