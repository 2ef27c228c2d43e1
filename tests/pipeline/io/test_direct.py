"""Large tensors' whole pages go to the disk past the page cache; every byte lands where the
buffered path put it."""

import errno
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from loraforge.pipeline.io import direct
from loraforge.pipeline.io.direct import MIN_DIRECT, PAGE, aligned_tensor, write_bytes


def blank(path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def random_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture
def local_disk(monkeypatch):
    """tmp_path taken for a local disk wherever it is (a tmpfs then refuses O_DIRECT at open,
    which the write survives and the open is still recorded)."""
    monkeypatch.setattr(direct, "filesystem_of", lambda path: "ext4")


class Opens:
    """os.open, recording whether each call asked for O_DIRECT."""

    def __init__(self, monkeypatch, refuse_direct: bool = False):
        self.direct = []
        real = os.open

        def opener(path, flags, *args):
            self.direct.append(bool(flags & os.O_DIRECT))
            if refuse_direct and flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument", path)
            return real(path, flags, *args)

        monkeypatch.setattr(direct.os, "open", opener)


@pytest.mark.parametrize("offset", [0, 123, PAGE, 3 * PAGE - 1])
def test_a_large_write_lands_byte_for_byte_with_its_whole_pages_direct(
    tmp_path, monkeypatch, offset
):
    path = tmp_path / "out.bin"
    data = random_bytes(MIN_DIRECT + 5 * PAGE + 77, seed=offset)
    blank(path, offset + len(data) + 1000)
    opens = Opens(monkeypatch)
    write_bytes(str(path), memoryview(data), offset)
    assert opens.direct == [True, False]  # the whole pages, then the partial ones at the ends
    content = path.read_bytes()
    assert content[offset : offset + len(data)] == data
    assert content[:offset] == bytes(offset) and content[offset + len(data) :] == bytes(1000)


def test_small_writes_and_refused_direct_writes_go_through_the_page_cache(
    tmp_path, monkeypatch, local_disk
):
    path = tmp_path / "out.bin"
    small, large = random_bytes(MIN_DIRECT - 1, 1), random_bytes(2 * MIN_DIRECT, 2)
    blank(path, 4 * MIN_DIRECT)
    opens = Opens(monkeypatch, refuse_direct=True)
    write_bytes(str(path), memoryview(small), 5)
    write_bytes(str(path), memoryview(large), MIN_DIRECT + 9)
    assert opens.direct == [False, True, False]  # small: never tried; large: refused, then all
    content = path.read_bytes()
    assert content[5 : 5 + len(small)] == small
    assert content[MIN_DIRECT + 9 : MIN_DIRECT + 9 + len(large)] == large


def test_an_aligned_tensor_is_written_from_where_it_is(tmp_path, monkeypatch, local_disk):
    offset = 2 * PAGE + 6
    tensor = aligned_tensor((1024, 1030), torch.bfloat16, offset)
    assert tensor.data_ptr() % PAGE == offset % PAGE and tensor.is_contiguous()
    tensor.copy_(torch.randn(1024, 1030))
    data = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    path = tmp_path / "out.bin"
    blank(path, offset + len(data))

    def no_staging():
        raise AssertionError("staged")

    monkeypatch.setattr(direct, "_staging", no_staging)
    write_bytes(str(path), data, offset)
    assert path.read_bytes()[offset:] == bytes(data)
    again = aligned_tensor((1024, 1030), torch.bfloat16, offset)
    assert again.data_ptr() == tensor.data_ptr()  # the thread's buffer, reused
    assert aligned_tensor((3,), torch.float32, 2).data_ptr() % 4 == 0  # odd place: its own


def test_neighbours_sharing_a_page_written_side_by_side(tmp_path, local_disk):
    """Tensors packed back to back share their boundary pages, which only the page cache
    writes; two threads writing neighbours at once leave every byte of both."""
    sizes = [MIN_DIRECT + 3001, 17, MIN_DIRECT + 2 * PAGE + 5, MIN_DIRECT + 999, 4000]
    offsets = np.cumsum([41, *sizes[:-1]]).tolist()
    chunks = [random_bytes(n, seed) for seed, n in enumerate(sizes)]
    path = tmp_path / "out.bin"
    blank(path, offsets[-1] + sizes[-1])
    with ThreadPoolExecutor(2) as pool:
        list(
            pool.map(lambda i: write_bytes(str(path), memoryview(chunks[i]), offsets[i]), range(5))
        )
    assert path.read_bytes() == bytes(41) + b"".join(chunks)


def test_only_local_disk_filesystems_are_written_direct(tmp_path, monkeypatch):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        "31 27 0:40 / /mnt/shared\\040data rw - nfs4 server:/export rw\n"
        "32 27 0:41 / /mnt/scratch rw shared:5 - lustre 10.0.0.1@tcp:/fs rw\n"
        "33 27 0:42 / /dev/shm rw - tmpfs tmpfs rw\n"
    )
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(
            mountinfo if path == "/proc/self/mountinfo" else path, *a, **k
        ),
    )
    direct._mounts.cache_clear()
    try:
        assert direct.filesystem_of("/mnt/shared data/out/model.safetensors") == "nfs4"
        assert direct.filesystem_of("/mnt/scratch/model.safetensors") == "lustre"
        assert direct.filesystem_of("/mnt/scratchy/model.safetensors") == "ext4"
        assert direct.filesystem_of("/dev/shm/model.safetensors") == "tmpfs"
        path = tmp_path / "out.bin"  # ext4 by the table above: direct
        data = random_bytes(2 * MIN_DIRECT, 3)
        blank(path, len(data) + 10)
        opens = Opens(monkeypatch)
        write_bytes(str(path), memoryview(data), 10)
        monkeypatch.setattr(direct, "filesystem_of", lambda path: "nfs4")
        write_bytes(str(path), memoryview(data[::-1]), 10)
        assert opens.direct == [True, False, False]  # nfs4: the page cache, all of it
        assert path.read_bytes()[10:] == data[::-1]
    finally:
        direct._mounts.cache_clear()
