"""Reading ahead: each task's stored tensors are asked for in the order given, never more than
the window beyond the finished tasks, and the thread and its descriptors go at exit."""

from __future__ import annotations

import os
import threading
import time

from loraforge.pipeline.io import readahead
from loraforge.pipeline.io.readahead import ReadAhead, ranges
from loraforge.pipeline.io.reader import TensorInfo


def info(file, offset, n, scale=None):
    return TensorInfo(f"t{offset}", file, "F32", (n // 4,), offset, scale)


def wait_for(condition, seconds=5.0):
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_ranges_cover_tensors_and_their_scales_with_a_known_offset():
    scale = info("/m/scales", 8, 4)
    reads = [
        info("/m/a", 100, 400, scale),
        info("/m/b", 0, 0),
        TensorInfo("pt", "/m/c.pt", "F32", (4,)),
    ]
    assert ranges(reads) == [("/m/a", 100, 400), ("/m/scales", 8, 4)]


def test_asks_in_order_and_stays_within_the_window(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(ReadAhead, "_advise", lambda self, f, o, n: asked.append((f, o, n)))
    file = str(tmp_path / "x")
    plan = [(f"k{i}", [info(file, 100 * i, 100)]) for i in range(5)]
    with ReadAhead(plan, window=250) as ahead:
        wait_for(lambda: len(asked) == 3)  # 0, 100, 200 asked: 300 >= 250
        time.sleep(0.05)
        assert asked == [(file, 0, 100), (file, 100, 100), (file, 200, 100)]
        ahead.finished("k0")  # 200 outstanding: one more
        wait_for(lambda: len(asked) == 4)
        time.sleep(0.05)
        assert len(asked) == 4
        ahead.finished("k1")
        wait_for(lambda: len(asked) == 5)
    assert [o for _f, o, _n in asked] == [0, 100, 200, 300, 400]


def test_a_tensor_larger_than_the_window_is_asked_for_up_to_the_window(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(ReadAhead, "_advise", lambda self, f, o, n: asked.append((f, o, n)))
    with ReadAhead([("big", [info("/m/a", 0, 4000)])], window=1000):
        wait_for(lambda: asked)
    assert asked == [("/m/a", 0, 1000)]


def test_exit_stops_a_waiting_thread_and_closes_its_files(tmp_path):
    file = tmp_path / "x.bin"
    file.write_bytes(b"\0" * 8192)
    plan = [("k0", [info(str(file), 0, 4096)]), ("k1", [info(str(file), 4096, 4096)])]
    ahead = ReadAhead(plan, window=4096)
    with ahead:
        wait_for(lambda: str(file) in ahead._fds)  # k0 asked, k1 waits for the window
    assert not ahead._thread.is_alive()
    open_files = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
    assert os.path.realpath(file) not in open_files
    assert "loraforge-readahead" not in [t.name for t in threading.enumerate()]


def test_a_missing_file_is_skipped(tmp_path):
    with ReadAhead([("k", [info(str(tmp_path / "gone"), 0, 10)])], window=100) as ahead:
        wait_for(lambda: str(tmp_path / "gone") in ahead._fds)
    assert ahead._fds == {str(tmp_path / "gone"): None}


def test_the_window_is_at_most_an_eighth_of_ram(monkeypatch):
    pages = {"SC_PHYS_PAGES": 2048, "SC_PAGE_SIZE": 4096}  # 8 MiB of RAM
    monkeypatch.setattr(readahead.os, "sysconf", lambda name: pages[name])
    assert readahead.default_window() == 1 << 20
    pages["SC_PHYS_PAGES"] = 1 << 30
    assert readahead.default_window() == readahead.WINDOW
