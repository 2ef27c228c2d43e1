"""A tensor streamed to its slot as its rows are made lands byte for byte, whole pages direct
and the shared end pages through the page cache; with write-behind the task goes on while the
disk finishes, and a failed write still ends the run."""

import errno
import fcntl
import os
import threading

import numpy as np
import pytest
import torch

from loraforge.pipeline.io import stream
from loraforge.pipeline.io.direct import MIN_DIRECT, PAGE
from loraforge.pipeline.io.layout import OutputEntry, Slot
from loraforge.pipeline.io.slots import checksum
from loraforge.pipeline.io.stream import StreamedSlot, finish_writes

COLS = 1030  # a row is 2060 bytes: blocks end mid-page


@pytest.fixture
def local_disk(monkeypatch):
    """tmp_path taken for a local disk wherever it is."""
    monkeypatch.setattr(stream, "filesystem_of", lambda path: "ext4")


@pytest.fixture
def direct_opens(monkeypatch):
    """Every os.open asking for O_DIRECT, recorded."""
    seen = []
    real = os.open

    def opener(path, flags, *args):
        if flags & os.O_DIRECT:
            seen.append(path)
        return real(path, flags, *args)

    monkeypatch.setattr(stream.os, "open", opener)
    return seen


def rows_of(seed: int, n: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, COLS))).bfloat16()


def blank(path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def stream_rows(slot: Slot, values: torch.Tensor, block: int, behind: bool) -> int:
    """``values`` made ``block`` rows at a time in the stream's own buffer; the checksum."""
    with StreamedSlot(slot, values.dtype, behind) as out:
        for start in range(0, values.shape[0], block):
            stop = min(start + block, values.shape[0])
            rows = out.destination(start, stop)
            rows.copy_(values[start:stop])
            out.write(rows)
        return out.close()


def bytes_of(values: torch.Tensor) -> bytes:
    return values.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("behind", [False, True])
@pytest.mark.parametrize("offset", [0, 2 * PAGE + 6])
def test_rows_made_in_place_land_byte_for_byte(tmp_path, local_disk, direct_opens, behind, offset):
    values = rows_of(offset, 2 * MIN_DIRECT // (2 * COLS) + 77)
    path = tmp_path / "out.bin"
    blank(path, offset + values.numel() * 2 + 500)
    slot = Slot(str(path), offset, OutputEntry("w", "BF16", tuple(values.shape)))
    crc = stream_rows(slot, values, block=100, behind=behind)
    finish_writes([str(path)])
    expected = bytes_of(values)
    content = path.read_bytes()
    assert content[offset : offset + len(expected)] == expected
    assert content[:offset] == bytes(offset) and content[offset + len(expected) :] == bytes(500)
    assert crc == checksum(expected, zip_crc=False)
    assert direct_opens == [str(path)]


def test_neighbours_streamed_from_two_threads_leave_every_byte(tmp_path, local_disk):
    """Tensors packed back to back share boundary pages, which only the page cache writes."""
    counts = [1100, 3, 1500, 1234, 2, 1100]
    tensors = [rows_of(seed, n) for seed, n in enumerate(counts)]
    sizes = [t.numel() * 2 for t in tensors]
    offsets = np.cumsum([41, *sizes[:-1]]).tolist()
    path = tmp_path / "out.bin"
    blank(path, offsets[-1] + sizes[-1])
    slots = [
        Slot(str(path), o, OutputEntry(f"w{i}", "BF16", tuple(t.shape)))
        for i, (o, t) in enumerate(zip(offsets, tensors, strict=True))
    ]

    def worker(indices):
        for i in indices:
            stream_rows(slots[i], tensors[i], block=64, behind=True)

    threads = [threading.Thread(target=worker, args=(ix,)) for ix in ([0, 2, 4], [1, 3, 5])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    finish_writes([str(path)])
    assert path.read_bytes() == bytes(41) + b"".join(bytes_of(t) for t in tensors)


def test_a_refused_direct_write_goes_through_the_page_cache(tmp_path, local_disk, monkeypatch):
    values = rows_of(5, 2 * MIN_DIRECT // (2 * COLS))
    path = tmp_path / "out.bin"
    blank(path, 6 + values.numel() * 2)
    real = os.pwrite
    refused = []

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(stream.os, "pwrite", refuse_direct)
    slot = Slot(str(path), 6, OutputEntry("w", "BF16", tuple(values.shape)))
    stream_rows(slot, values, block=300, behind=True)
    finish_writes([str(path)])
    assert refused == [PAGE]  # the first whole page, then never again
    assert path.read_bytes()[6:] == bytes_of(values)


def test_a_threads_next_tensors_never_overwrite_one_still_being_written(
    tmp_path, local_disk, monkeypatch
):
    """The first tensor's direct write is held back: the second is made in the thread's other
    buffer, and the third waits for the first's writes before taking its buffer."""
    tensors = [rows_of(seed, 1100) for seed in range(3)]
    size = tensors[0].numel() * 2
    path = tmp_path / "out.bin"
    blank(path, 3 * size)
    held = threading.Event()
    real = stream.write_direct_chunk

    def held_back(fd, chunk, start, where):
        if start < size:
            held.wait(5)
        return real(fd, chunk, start, where)

    monkeypatch.setattr(stream, "write_direct_chunk", held_back)
    threading.Timer(0.3, held.set).start()
    for i, values in enumerate(tensors):
        slot = Slot(str(path), i * size, OutputEntry(f"w{i}", "BF16", tuple(values.shape)))
        stream_rows(slot, values, block=64, behind=True)
    finish_writes([str(path)])
    assert path.read_bytes() == b"".join(bytes_of(t) for t in tensors)


def test_a_failed_write_behind_is_raised_by_finish_writes(tmp_path, local_disk, monkeypatch):
    values = rows_of(6, 2 * MIN_DIRECT // (2 * COLS))
    path = tmp_path / "out.bin"
    blank(path, values.numel() * 2)

    def full(fd, chunk, start, where):
        raise OSError(errno.ENOSPC, "No space left on device", where)

    monkeypatch.setattr(stream, "write_direct_chunk", full)
    slot = Slot(str(path), 0, OutputEntry("w", "BF16", tuple(values.shape)))
    stream_rows(slot, values, block=300, behind=True)  # handed over: no error yet
    finish_writes([str(tmp_path / "another-run.bin")])  # not this run's file: not raised there
    with pytest.raises(OSError) as failed:
        finish_writes([str(path)])
    assert (failed.value.errno, failed.value.filename) == (errno.ENOSPC, str(path))
    finish_writes([str(path)])  # reported once: nothing is left in flight


def test_a_failing_run_waits_for_its_writes_without_raising_them(tmp_path, local_disk, monkeypatch):
    values = rows_of(7, 2 * MIN_DIRECT // (2 * COLS))
    path = tmp_path / "out.bin"
    blank(path, values.numel() * 2)
    gate = threading.Event()

    def slow(*args):
        gate.wait(5)
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(stream, "write_direct_chunk", slow)
    slot = Slot(str(path), 0, OutputEntry("w", "BF16", tuple(values.shape)))
    stream_rows(slot, values, block=300, behind=True)
    threading.Timer(0.05, gate.set).start()
    finish_writes([str(path)], raise_errors=False)  # once the write has ended, failed or not
    assert gate.is_set()


def test_rows_must_come_in_order_from_the_buffer(tmp_path):
    values = rows_of(8, 10)
    path = tmp_path / "out.bin"
    blank(path, values.numel() * 2)
    slot = Slot(str(path), 0, OutputEntry("w", "BF16", tuple(values.shape)))
    with StreamedSlot(slot, torch.bfloat16) as out:
        out.destination(0, 5).copy_(values[:5])
        with pytest.raises(ValueError, match="w: rows written out of order or elsewhere"):
            out.write(out.destination(5, 10))
        with pytest.raises(RuntimeError, match="w: 0 of 20600 bytes made"):
            out.close()


def test_a_written_tensor_lets_go_of_its_buffer(tmp_path, local_disk):
    """Once its bytes are on the disk a stream holds no view of the thread's buffer, so a
    mapping the buffer outgrew is freed then, not at the end of the run."""
    values = rows_of(9, 2 * MIN_DIRECT // (2 * COLS))
    path = tmp_path / "out.bin"
    blank(path, values.numel() * 2)
    slot = Slot(str(path), 0, OutputEntry("w", "BF16", tuple(values.shape)))
    with StreamedSlot(slot, values.dtype, behind=True) as out:
        out.destination(0, values.shape[0]).copy_(values)
        out.write(out.buffer)
        out.close()
        finish_writes([str(path)])
    assert out.buffer is None
    assert path.read_bytes() == bytes_of(values)
