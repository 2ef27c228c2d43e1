import threading
import time

import google_crc32c
import numpy as np
import pytest

from loraforge.pipeline.io import crc32c as crc_module
from loraforge.pipeline.io.crc32c import crc32c

DATA = bytes(range(256)) * 4099  # not a multiple of any word size


def test_the_c_library_is_called_without_the_gil_here():
    """The point of the module: with google_crc32c's C extension installed (as it is here),
    the hash goes through its library's ``crc32c_extend`` by ctypes, which releases the GIL."""
    extend = crc_module._c_extend()
    assert extend is not None
    assert extend(0, np.frombuffer(DATA, np.uint8).ctypes.data, len(DATA)) == (
        google_crc32c.value(DATA)
    )


@pytest.mark.parametrize("kind", ["bytes", "memoryview", "ndarray"])
def test_equals_google_crc32c(kind):
    data = {
        "bytes": DATA,
        "memoryview": memoryview(DATA),
        "ndarray": np.frombuffer(DATA, np.uint8),
    }[kind]
    assert crc32c(data) == google_crc32c.value(DATA)
    assert crc32c(b"") == google_crc32c.value(b"") == 0


def test_extends_piece_by_piece():
    array = np.frombuffer(DATA, np.uint8)
    crc = 0
    for start in range(0, len(DATA), 100_003):
        crc = crc32c(array[start : start + 100_003], crc)
    assert crc == google_crc32c.value(DATA)


def test_refuses_a_strided_view():
    with pytest.raises(ValueError, match="contiguous"):
        crc32c(np.frombuffer(DATA, np.uint8)[::2])


def test_falls_back_to_google_crc32c(monkeypatch):
    monkeypatch.setattr(crc_module, "_c_extend", lambda: None)
    assert crc32c(np.frombuffer(DATA, np.uint8), 7) == google_crc32c.extend(7, DATA)


def hash_and_watch(data: np.ndarray) -> tuple[float, float, list[float]]:
    """Hash ``data`` while another thread stamps the time in a Python loop: the hash's start
    and end and the stamps."""
    stamps: list[float] = []
    done = threading.Event()

    def stamp():
        while not done.is_set():
            stamps.append(time.perf_counter())

    watcher = threading.Thread(target=stamp)
    watcher.start()
    while not stamps:
        time.sleep(0.001)
    try:
        start = time.perf_counter()
        crc32c(data)
        end = time.perf_counter()
    finally:
        done.set()
        watcher.join()
    return start, end, stamps


def test_other_threads_run_while_it_hashes():
    """A thread stamping the time in Python gets turns during the first half of a long hash:
    with the GIL held through the hash it could run only after it."""
    start, end, stamps = hash_and_watch(np.ones(256 << 20, np.uint8))
    assert any(start < s < start + (end - start) / 2 for s in stamps)
