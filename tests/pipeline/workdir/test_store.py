"""The work directory's arrays are plain zarr v3: written directly, read back by zarr."""

import json
import os

import numpy as np
import pytest
import zarr
import zarr.storage
from zarr.codecs import Crc32cCodec

from loraforge.pipeline.workdir import CorruptEntry, WorkDir
from loraforge.pipeline.workdir import store as store_module
from loraforge.pipeline.workdir.zarr_direct import ChecksumMismatch, read_array, write_array


def zarrs_own(
    folder, name: str, data: np.ndarray, chunks: tuple, attributes: dict, separator: str = "."
) -> None:
    """``data`` written by zarr itself in the layout zarr_direct writes (``.``-separated chunk
    keys) and reads (``/`` too: older work directories)."""
    zarr.create_array(
        store=zarr.storage.LocalStore(str(folder)),
        name=name,
        data=data,
        chunks=chunks,
        compressors=[Crc32cCodec()],
        attributes=attributes,
        chunk_key_encoding={"name": "default", "separator": separator},
    )


@pytest.mark.parametrize(
    "shape,chunks", [((7, 5), (3, 5)), ((10,), (4,)), ((), ()), ((0, 3), (1, 3)), ((4, 6), (4, 6))]
)
def test_direct_arrays_equal_zarrs_own(tmp_path, shape, chunks):
    data = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) / 7
    write_array(str(tmp_path / "direct"), data, chunks, {"note": [1.5]})
    zarrs_own(tmp_path, "reference", data, chunks, {"note": [1.5]})
    direct = zarr.open_array(str(tmp_path / "direct"), mode="r")
    assert direct.shape == shape and direct.attrs["note"] == [1.5]
    np.testing.assert_array_equal(direct[...], data)
    theirs, ours = (set(os.listdir(tmp_path / d)) for d in ("reference", "direct"))
    # zarr skips a chunk equal to the fill value (the 0-d array's 0.0); ours writes every one
    assert theirs <= ours and all(os.path.isfile(tmp_path / "direct" / name) for name in ours)
    for name in theirs - {"zarr.json"}:
        assert (tmp_path / "direct" / name).read_bytes() == (
            tmp_path / "reference" / name
        ).read_bytes()
    meta = json.loads((tmp_path / "direct" / "zarr.json").read_text())
    assert meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "."}}


@pytest.mark.parametrize("separator", [".", "/"])
@pytest.mark.parametrize(
    "shape,chunks", [((7, 5), (3, 5)), ((10,), (4,)), ((), ()), ((0, 3), (1, 3)), ((5, 6), (2, 4))]
)
def test_the_direct_reader_reads_what_zarr_writes_in_this_layout(
    tmp_path, shape, chunks, separator
):
    # no chunk all zeros: zarr skips writing those, our writer (and so our reader) never does
    data = (np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) + 1) / 7
    zarrs_own(tmp_path, "a", data, chunks, {"singular_values": [3.0, 1.0]}, separator)
    array, attributes = read_array(str(tmp_path / "a"))
    assert array.dtype == np.float32 and array.shape == shape
    np.testing.assert_array_equal(array, data)
    assert attributes == {"singular_values": [3.0, 1.0]}


def test_the_direct_reader_leaves_other_layouts_to_zarr_and_refuses_damage(tmp_path):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    zarr.create_array(store=zarr.storage.LocalStore(str(tmp_path)), name="gzip", data=data,
                      chunks=(2, 4))  # zarr's default compressor: not our layout  # fmt: skip
    assert read_array(str(tmp_path / "gzip")) is None
    write_array(str(tmp_path / "ours"), data, (2, 4))
    chunk = tmp_path / "ours" / "c.1.0"
    damaged = bytearray(chunk.read_bytes())
    damaged[0] ^= 1
    chunk.write_bytes(bytes(damaged))
    with pytest.raises(ChecksumMismatch, match=r"chunk \(1, 0\) of .*ours: damaged"):
        read_array(str(tmp_path / "ours"))
    chunk.unlink()
    with pytest.raises(FileNotFoundError):
        read_array(str(tmp_path / "ours"))


def test_save_load_roundtrip_and_truncation_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_CHUNK_BYTES", 64)
    work = WorkDir(str(tmp_path / "w"))
    work.create()
    up = np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32)
    marker = {"array_shapes": {"up": [9, 4]}}
    work.save("a/b.weight", {"up": up}, marker, {"up": {"singular_values": [2.0]}})
    arrays, attributes = work.load("a/b.weight", work.read_marker("a/b.weight"))
    np.testing.assert_array_equal(arrays["up"], up)
    assert attributes["up"]["singular_values"] == [2.0]
    chunk = tmp_path / "w" / "tensors" / "a%2Fb.weight" / "up" / "c.1.0"
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with pytest.raises(CorruptEntry):
        work.load("a/b.weight", work.read_marker("a/b.weight"))


def test_load_many_reads_arrays_zarr_made_beside_its_own_and_names_damage(tmp_path):
    """An entry whose arrays zarr wrote itself (gzip, an older loraforge) is read through
    zarr, the direct arrays of the same entry kept; a damaged one is that entry's
    CorruptEntry, the other entries load."""
    work = WorkDir(str(tmp_path / "w"))
    work.create()
    up = np.arange(12, dtype=np.float32).reshape(6, 2) + 1
    down = np.arange(8, dtype=np.float32).reshape(2, 4) + 1
    work.save("ours.weight", {"up": up, "down": down}, {"kind": "lowrank"}, {"up": {"s": [1.0]}})
    work.save("mixed.weight", {"down": down}, {"kind": "lowrank"})
    zarr.create_array(
        store=zarr.storage.LocalStore(work.tensors),
        name="mixed.weight/up",
        data=up,
        chunks=(3, 2),
        attributes={"s": [2.0]},
    )  # zarr's default gzip: not the direct layout
    marker = {"arrays": ["down", "up"], "array_shapes": {"up": [6, 2], "down": [2, 4]}}
    (tmp_path / "w" / "tensors" / "ours.weight" / "down" / "c.0.0").write_bytes(b"short")
    loaded = work.load_many([("mixed.weight", marker), ("ours.weight", marker)])
    assert list(loaded) == ["mixed.weight", "ours.weight"]
    arrays, attributes = loaded["mixed.weight"]
    np.testing.assert_array_equal(arrays["up"], up)
    np.testing.assert_array_equal(arrays["down"], down)
    assert attributes == {"up": {"s": [2.0]}, "down": {}}
    assert isinstance(loaded["ours.weight"], CorruptEntry)
    assert str(loaded["ours.weight"]).startswith("ours.weight/down: ChecksumMismatch: chunk (0, 0)")
    wrong = {**marker, "array_shapes": {"up": [2, 6]}}
    assert str(work.load_many([("mixed.weight", wrong)])["mixed.weight"]) == (
        "mixed.weight/up: expected shape [2, 6]"
    )


def test_a_new_work_directory_is_a_zarr_group_zarr_opens(tmp_path):
    work = WorkDir(str(tmp_path / "w"))
    work.create()
    work.save("a.weight", {"diff": np.ones((2, 3), np.float32)}, {"kind": "diff"})
    work.create()  # again (a resume): the root group is kept as it is
    group = zarr.open_group(zarr.storage.LocalStore(work.tensors), mode="r")
    assert list(group.group_keys()) == ["a.weight"]
    np.testing.assert_array_equal(group["a.weight"]["diff"][...], np.ones((2, 3), np.float32))
