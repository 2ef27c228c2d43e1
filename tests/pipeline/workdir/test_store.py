"""The work directory's arrays are plain zarr v3: written directly, read back by zarr."""

import os

import numpy as np
import pytest
import zarr
import zarr.storage
from zarr.codecs import Crc32cCodec

from loraforge.pipeline.workdir import CorruptEntry, WorkDir
from loraforge.pipeline.workdir import store as store_module
from loraforge.pipeline.workdir.zarr_direct import write_array


@pytest.mark.parametrize(
    "shape,chunks", [((7, 5), (3, 5)), ((10,), (4,)), ((), ()), ((0, 3), (1, 3)), ((4, 6), (4, 6))]
)
def test_direct_arrays_equal_zarrs_own(tmp_path, shape, chunks):
    data = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) / 7
    write_array(str(tmp_path / "direct"), data, chunks, {"note": [1.5]})
    zarr.create_array(
        store=zarr.storage.LocalStore(str(tmp_path)),
        name="reference",
        data=data,
        chunks=chunks,
        compressors=[Crc32cCodec()],
        attributes={"note": [1.5]},
    )
    direct = zarr.open_array(str(tmp_path / "direct"), mode="r")
    assert direct.shape == shape and direct.attrs["note"] == [1.5]
    np.testing.assert_array_equal(direct[...], data)
    for root, _dirs, files in os.walk(tmp_path / "reference"):
        for name in files:
            if name != "zarr.json":
                theirs = os.path.join(root, name)
                ours = theirs.replace("reference", "direct")
                assert open(ours, "rb").read() == open(theirs, "rb").read()


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
    chunk = tmp_path / "w" / "tensors" / "a%2Fb.weight" / "up" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-3])
    with pytest.raises(CorruptEntry):
        work.load("a/b.weight", work.read_marker("a/b.weight"))
