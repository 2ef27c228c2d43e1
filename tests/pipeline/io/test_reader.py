import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from loraforge.pipeline.errors import CheckpointFormatError, CheckpointNotFound, UnsafePickle
from loraforge.pipeline.io.maps import prefault
from loraforge.pipeline.io.reader import index_checkpoint, load_tensor, mapped
from tests.helpers.checkpoints import Payload, corrupt, save_sharded

TENSORS = {
    "a.weight": torch.arange(12.0).reshape(3, 4).bfloat16(),
    "a.bias": torch.arange(3, dtype=torch.float32),
    "steps": torch.arange(5),
}


def check_all(index):
    assert set(index.tensors) == set(TENSORS)
    for key, expected in TENSORS.items():
        info = index.tensors[key]
        assert info.shape == tuple(expected.shape)
        assert torch.equal(load_tensor(info), expected)
    assert torch.equal(
        load_tensor(index.tensors["a.weight"], torch.float32), TENSORS["a.weight"].float()
    )


def test_single_file(tmp_path):
    save_file(TENSORS, tmp_path / "m.safetensors")
    index = index_checkpoint(str(tmp_path / "m.safetensors"))
    check_all(index)
    assert index.files["m.safetensors"]["size"] == os.path.getsize(tmp_path / "m.safetensors")


@pytest.mark.parametrize("with_index", [True, False])
def test_shard_directory(tmp_path, with_index):
    save_sharded(TENSORS, str(tmp_path / "d"), shards=2, index=with_index)
    check_all(index_checkpoint(str(tmp_path / "d")))


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    save_sharded(TENSORS, str(tmp_path / "d"), shards=2)
    os.unlink(tmp_path / "d" / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointNotFound, match="model-00002-of-00002.safetensors"):
        index_checkpoint(str(tmp_path / "d"))


def test_duplicate_key_across_shards(tmp_path):
    (tmp_path / "d").mkdir()
    save_file({"x": torch.zeros(2)}, tmp_path / "d" / "a.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "d" / "b.safetensors")
    with pytest.raises(CheckpointFormatError, match="also stored in a.safetensors"):
        index_checkpoint(str(tmp_path / "d"))


def test_missing_path_empty_dir_and_wrong_extension(tmp_path):
    with pytest.raises(CheckpointNotFound, match="no such file"):
        index_checkpoint(str(tmp_path / "nope.safetensors"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFound, match="no .safetensors files"):
        index_checkpoint(str(tmp_path / "empty"))
    torch.save(TENSORS, tmp_path / "m.pt")
    with pytest.raises(CheckpointFormatError, match="must end with .safetensors"):
        index_checkpoint(str(tmp_path / "m.pt"), "safetensors")
    save_file(TENSORS, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointFormatError, match="must be a .pt, .pth or .bin"):
        index_checkpoint(str(tmp_path / "m.safetensors"), "pytorch")


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_pytorch_checkpoint(tmp_path, wrapper):
    obj = TENSORS if wrapper is None else {wrapper: TENSORS, "epoch": 3}
    torch.save(obj, tmp_path / "m.pth")
    check_all(index_checkpoint(str(tmp_path / "m.pth"), "pytorch"))


def test_pickle_with_code_is_refused(tmp_path):
    torch.save({"a": torch.zeros(2), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickle, match="refusing a pickle"):
        index_checkpoint(str(tmp_path / "evil.pt"), "pytorch")


def test_legacy_pickle_is_refused(tmp_path):
    with open(tmp_path / "old.pt", "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(CheckpointFormatError, match="zip-format"):
        index_checkpoint(str(tmp_path / "old.pt"), "pytorch")


@pytest.mark.parametrize(
    "how,message",
    [
        ("header length", "bad header length"),
        ("json", "not valid JSON"),
        ("truncated", "past the end"),
        ("tiny", "too short"),
    ],
)
def test_corrupt_safetensors(tmp_path, how, message):
    path = tmp_path / "m.safetensors"
    save_file(TENSORS, path)
    corrupt(path, how)
    with pytest.raises(CheckpointFormatError, match=message) as e:
        index_checkpoint(str(path))
    assert str(path) in str(e.value)


def test_mapped_view_follows_a_rewritten_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(5000)}, path)
    info = index_checkpoint(str(path)).tensors["w"]
    with mapped(info) as view:
        assert view.shape == (5000,) and float(view.sum()) == 0.0
    save_file({"w": torch.ones(5000)}, path)
    with mapped(index_checkpoint(str(path)).tensors["w"]) as view:
        prefault(view)  # a no-op for the values: only faults the pages in
        assert float(view.sum()) == 5000.0


def test_index_json_that_lies(tmp_path):
    save_sharded(TENSORS, str(tmp_path / "d"), shards=2)
    index_file = tmp_path / "d" / "model.safetensors.index.json"
    data = json.loads(index_file.read_text())
    data["weight_map"]["a.bias"] = (
        "model-00002-of-00002.safetensors"
        if data["weight_map"]["a.bias"].startswith("model-00001")
        else "model-00001-of-00002.safetensors"
    )
    index_file.write_text(json.dumps(data))
    with pytest.raises(CheckpointFormatError, match="does not hold it"):
        index_checkpoint(str(tmp_path / "d"))
