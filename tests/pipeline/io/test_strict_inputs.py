"""Crafted safetensors headers and shard indexes: each refusal's exact message, and that the
safetensors library (``safe_open``) refuses the same files, so loraforge is at least as strict."""

import json
import os
import struct

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from loraforge.pipeline.errors import CheckpointFormatError
from loraforge.pipeline.io.reader import index_checkpoint, load_tensor
from loraforge.pipeline.io.safetensors_format import encode_header

CORRUPT = " (the file is corrupt; re-save it)"
TRUNCATED = " (the file is truncated; re-download or re-save it)"
ENTRY_SHAPE = "the index places this tensor in {!r}, which is not a file name in the checkpoint"
SHARD_HINT = " (shards must sit in the checkpoint directory; fix the index or move the shard)"


def f32(begin, end, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


def craft(path, header, data=b""):
    """8-byte little-endian length, the JSON header (or raw bytes), then ``data``."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def library_reads(path):
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def deep(levels):
    return b"[" * levels + b"]" * levels


# (id, header, data, message after "<path>: ")
REFUSED = [
    (
        "overlap",
        {"a": f32(0, 8), "b": f32(4, 12)},
        bytes(12),
        "tensor 'b': data offsets [4, 12] overlap those of tensor 'a' [0, 8]" + CORRUPT,
    ),
    (
        "same span twice",
        {"a": f32(0, 8), "b": f32(0, 8)},
        bytes(8),
        "tensor 'b': data offsets [0, 8] overlap those of tensor 'a' [0, 8]" + CORRUPT,
    ),
    (
        "empty tensor inside another",
        {"a": f32(0, 8), "z": f32(4, 4, (0,))},
        bytes(8),
        "tensor 'z': data offsets [4, 4] overlap those of tensor 'a' [0, 8]" + CORRUPT,
    ),
    (
        "gap",
        {"a": f32(0, 8), "b": f32(12, 20)},
        bytes(20),
        "tensor 'b': data offsets [12, 20] leave a gap of 4 bytes after tensor 'a'" + CORRUPT,
    ),
    (
        "first not at 0",
        {"a": f32(4, 12)},
        bytes(12),
        "tensor 'a': data offsets [4, 12] leave a gap of 4 bytes after the start of the data"
        + CORRUPT,
    ),
    (
        "data shorter than claimed",
        {"a": f32(0, 8), "b": f32(8, 16)},
        bytes(12),
        "tensor 'b': data offsets [8, 16] run past the end of the data (12 bytes)" + TRUNCATED,
    ),
    (
        "trailing bytes",
        {"a": f32(0, 8)},
        bytes(12),
        "tensor 'a': 4 bytes after this tensor's data belong to no tensor (the header covers 8 "
        "of 12 data bytes)" + CORRUPT,
    ),
    (
        "trailing bytes, no tensors",
        {},
        bytes(8),
        "the header names no tensors but the data holds 8 bytes" + CORRUPT,
    ),
    (
        "begin after end",
        {"a": f32(8, 0)},
        bytes(8),
        "tensor 'a': data offsets [8, 0] end before they begin" + CORRUPT,
    ),
    (
        "offsets not dtype x shape",
        {"a": f32(0, 12)},
        bytes(12),
        "tensor 'a': data offsets span 12 bytes but F32[2] needs 8" + CORRUPT,
    ),
    (
        "offsets not dtype x shape, 2-D",
        {"a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 6]}},
        bytes(6),
        "tensor 'a': data offsets span 6 bytes but BF16[2, 3] needs 12" + CORRUPT,
    ),
    (
        "negative dim",
        {"a": f32(0, 8, (-1, 2))},
        bytes(8),
        "tensor 'a': shape [-1, 2] has a negative dimension" + CORRUPT,
    ),
    (
        "dim above u64",
        {"a": f32(0, 0, (0, 2**64))},
        b"",
        "tensor 'a': shape [0, 18446744073709551616] has a dimension above 2**64 - 1" + CORRUPT,
    ),
    (
        "float dim",
        {"a": f32(0, 8, (2.0,))},
        bytes(8),
        "tensor 'a': shape [2.0] is not a list of integers" + CORRUPT,
    ),
    (
        "string dim",
        {"a": f32(0, 8, ("2",))},
        bytes(8),
        "tensor 'a': shape [\"2\"] is not a list of integers" + CORRUPT,
    ),
    (
        "bool dim",
        {"a": f32(0, 8, (True, 2))},
        bytes(8),
        "tensor 'a': shape [true, 2] is not a list of integers" + CORRUPT,
    ),
    (
        "shape not a list",
        {"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}},
        bytes(8),
        "tensor 'a': shape 2 is not a list of integers" + CORRUPT,
    ),
    (
        "three offsets",
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}},
        bytes(8),
        "tensor 'a': data_offsets [0, 8, 8] is not a pair of integers from 0 to 2**64 - 1"
        + CORRUPT,
    ),
    (
        "negative offset",
        {"a": f32(-8, 0)},
        bytes(8),
        "tensor 'a': data_offsets [-8, 0] is not a pair of integers from 0 to 2**64 - 1" + CORRUPT,
    ),
    (
        "entry not an object",
        {"a": [1, 2]},
        b"",
        "tensor 'a': header entry is a JSON array, not an object with dtype, shape and "
        "data_offsets" + CORRUPT,
    ),
    (
        "entry is a string",
        {"a": "F32"},
        b"",
        "tensor 'a': header entry is a JSON string, not an object with dtype, shape and "
        "data_offsets" + CORRUPT,
    ),
    (
        "no dtype",
        {"a": {"shape": [2], "data_offsets": [0, 8]}},
        bytes(8),
        "tensor 'a': header entry has no 'dtype'" + CORRUPT,
    ),
    (
        "unknown dtype",
        {"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}},
        bytes(8),
        "tensor 'a': unsupported dtype 'X9' (convert the tensor to one of F64, F32, F16, BF16, "
        "I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2)",
    ),
    (
        "metadata value a number",
        {"__metadata__": {"format": "pt", "step": 3}, "a": f32(0, 8)},
        bytes(8),
        "__metadata__ value of 'step' is a JSON number, not a string" + CORRUPT,
    ),
    (
        "metadata value null",
        {"__metadata__": {"format": None}, "a": f32(0, 8)},
        bytes(8),
        "__metadata__ value of 'format' is a JSON null, not a string" + CORRUPT,
    ),
    (
        "metadata value an object",
        {"__metadata__": {"nested": {"a": "b"}}},
        b"",
        "__metadata__ value of 'nested' is a JSON object, not a string" + CORRUPT,
    ),
    (
        "metadata a list",
        {"__metadata__": ["format", "pt"], "a": f32(0, 8)},
        bytes(8),
        "__metadata__ is a JSON array, not an object of strings" + CORRUPT,
    ),
    (
        "metadata a string",
        {"__metadata__": "pt", "a": f32(0, 8)},
        bytes(8),
        "__metadata__ is a JSON string, not an object of strings" + CORRUPT,
    ),
    (
        "NaN",
        b'{"__metadata__":{"lr":NaN},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        bytes(8),
        "header is not valid JSON (NaN is not a JSON value)" + CORRUPT,
    ),
    (
        "UTF-16 header",
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'.encode("utf-16"),
        bytes(8),
        "header is not valid JSON ('utf-8' codec can't decode byte 0xff in position 0: invalid "
        "start byte)" + CORRUPT,
    ),
    (
        "UTF-8 BOM",
        b'\xef\xbb\xbf{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
        bytes(8),
        "header is not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig))" + CORRUPT,
    ),
    (
        "extra field nested 126 levels",
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + deep(126) + b"}}",
        bytes(8),
        "tensor 'a': header entry field 'x' is nested too deeply (the library allows 127 levels "
        "in all)" + CORRUPT,
    ),
    (
        "extra field nested 5000 levels",
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + deep(5000) + b"}}",
        bytes(8),
        "header is not valid JSON (nested too deeply)" + CORRUPT,
    ),
    (
        "header not an object",
        [f32(0, 8)],
        bytes(8),
        "header is not a JSON object" + CORRUPT,
    ),
]


@pytest.mark.parametrize(
    "header,data,message", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_refused_header(tmp_path, header, data, message):
    path = craft(tmp_path / "m.safetensors", header, data)
    with pytest.raises(CheckpointFormatError) as e:
        index_checkpoint(str(path))
    assert str(e.value) == f"{path}: {message}"
    assert "\n" not in str(e.value)
    with pytest.raises(SafetensorError):  # the library refuses it too: we are no more lenient
        library_reads(path)


def test_header_above_the_library_limit(tmp_path):
    """100,000,000 bytes is the library's header limit; a sparse file keeps the test cheap."""
    path = tmp_path / "m.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(8 + 100_000_001)
    with pytest.raises(CheckpointFormatError) as e:
        index_checkpoint(str(path))
    assert str(e.value) == (
        f"{path}: bad header length 100000001 for a file of 100000009 bytes (truncated or not "
        "safetensors) (re-download or re-save the checkpoint)"
    )
    with pytest.raises(SafetensorError, match="header too large"):
        library_reads(path)


def test_dtype_the_library_knows_but_loraforge_does_not(tmp_path):
    """Deliberately stricter than the library: U16 (and U32, U64, C64, F4, ...) are refused."""
    path = craft(
        tmp_path / "m.safetensors",
        {"a": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}},
        bytes(4),
    )
    assert set(library_reads(path)) == {"a"}
    with pytest.raises(CheckpointFormatError) as e:
        index_checkpoint(str(path))
    assert str(e.value).startswith(f"{path}: tensor 'a': unsupported dtype 'U16' (convert ")


@pytest.mark.parametrize(
    "header,data",
    [
        ({}, b""),
        ({"__metadata__": {"format": "pt"}}, b""),
        ({"__metadata__": None, "a": f32(0, 8)}, bytes(8)),
        ({"z": f32(0, 0, (0,)), "a": f32(0, 8), "e": f32(8, 8, (2, 0))}, bytes(8)),
        ({"b": f32(8, 16), "a": f32(0, 8)}, bytes(16)),  # header order is not data order
        ({"a": {**f32(0, 8), "note": {"x": [1, 2]}}}, bytes(8)),  # extra fields are ignored
        (b'  {"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}    ', bytes(8)),
        (
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + deep(125) + b"}}",
            bytes(8),
        ),
    ],
    ids=[
        "empty",
        "metadata only",
        "null metadata",
        "empty tensors",
        "unordered",
        "extra field",
        "whitespace",
        "nested 125 levels",
    ],
)
def test_accepted_like_the_library(tmp_path, header, data):
    path = craft(tmp_path / "m.safetensors", header, data)
    expected = library_reads(path)
    index = index_checkpoint(str(path))
    assert set(index.tensors) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(load_tensor(index.tensors[key]), tensor)


def test_encode_header_output_passes(tmp_path):
    """Our own writer's layout (space-padded header, back-to-back data) is accepted."""
    entries = [("w", "BF16", (3, 5)), ("b", "F32", (3,)), ("n", "I64", (0,))]
    head, offsets = encode_header(entries, {"format": "pt"})
    path = tmp_path / "m.safetensors"
    path.write_bytes(head + bytes(offsets[-1][1] - len(head)))
    index = index_checkpoint(str(path))
    assert [index.tensors[k].offset for k, _, _ in entries] == [b for b, _ in offsets]
    assert set(library_reads(path)) == {"w", "b", "n"}


# ---- shard indexes ----


def shard_dir(tmp_path, weight_map):
    """A directory with shard ``x.safetensors`` holding tensor 'a' and an index ``weight_map``."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file({"a": torch.ones(2)}, directory / "x.safetensors")
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory, index


OUTSIDE = " outside the checkpoint directory"
ABSOLUTE = " an absolute path, not a file name in the checkpoint directory"


@pytest.mark.parametrize(
    "shard,message",
    [
        ("../x.safetensors", "the index places this tensor in '../x.safetensors'," + OUTSIDE),
        ("..", "the index places this tensor in '..'," + OUTSIDE),
        (
            "sub/../../x.safetensors",
            "the index places this tensor in 'sub/../../x.safetensors'," + OUTSIDE,
        ),
        ("{outside}", "the index places this tensor in '{outside}'," + ABSOLUTE),
        ("{inside}", "the index places this tensor in '{inside}'," + ABSOLUTE),
        ("sub/x.safetensors", ENTRY_SHAPE.format("sub/x.safetensors") + " directory"),
        ("", ENTRY_SHAPE.format("") + " directory"),
        (".", ENTRY_SHAPE.format(".") + " directory"),
        ("x\0.safetensors", ENTRY_SHAPE.format("x\0.safetensors") + " directory"),
    ],
    ids=[
        "parent",
        "dotdot",
        "escapes via sub",
        "absolute",
        "absolute inside",
        "subdirectory",
        "empty",
        "dot",
        "nul",
    ],
)
def test_index_shard_outside_the_directory(tmp_path, shard, message):
    # Each named file exists, so the refusal is about the name, not a missing shard.
    save_file({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    directory, index = shard_dir(tmp_path, {})
    (directory / "sub").mkdir()
    save_file({"a": torch.ones(2)}, directory / "sub" / "x.safetensors")
    names = {"outside": str(tmp_path / "x.safetensors"), "inside": str(directory / "x.safetensors")}
    shard = shard.format(**names)
    index.write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(CheckpointFormatError) as e:
        index_checkpoint(str(directory))
    assert str(e.value) == f"{index}: tensor 'a': {message.format(**names)}{SHARD_HINT}"


@pytest.mark.parametrize(
    "shard,shown", [(3, "3"), (None, "null"), (["x.safetensors"], '["x.safetensors"]')]
)
def test_index_shard_not_a_string(tmp_path, shard, shown):
    directory, index = shard_dir(tmp_path, {"a": shard})
    with pytest.raises(CheckpointFormatError) as e:
        index_checkpoint(str(directory))
    assert str(e.value) == (
        f"{index}: tensor 'a': the index places this tensor in {shown}, which is not a file name "
        "(each weight_map value must be the name of a shard file in this directory)"
    )


def test_index_dot_slash_name_is_the_plain_name(tmp_path):
    directory, _ = shard_dir(tmp_path, {"a": "./x.safetensors"})
    index = index_checkpoint(str(directory))
    assert index.tensors["a"].file == str(directory / "x.safetensors")
    assert torch.equal(load_tensor(index.tensors["a"]), torch.ones(2))


@pytest.mark.parametrize("with_index", [True, False])
def test_symlinked_shards_like_the_hugging_face_cache(tmp_path, with_index):
    """snapshots/<rev>/<shard> -> ../../blobs/<hash>: links leaving the directory are fine."""
    blobs = tmp_path / "hub" / "blobs"
    snapshot = tmp_path / "hub" / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    tensors = {"a": torch.arange(4.0), "b": torch.ones(3, dtype=torch.bfloat16)}
    weight_map = {}
    for i, key in enumerate(sorted(tensors)):
        save_file({key: tensors[key]}, blobs / f"blob{i}")
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        os.symlink(f"../../blobs/blob{i}", snapshot / name)
        weight_map[key] = name
    if with_index:
        blob = blobs / "index-blob"
        blob.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        os.symlink("../../blobs/index-blob", snapshot / "model.safetensors.index.json")
    index = index_checkpoint(str(snapshot))
    assert set(index.tensors) == set(tensors)
    for key, tensor in tensors.items():
        assert os.path.dirname(index.tensors[key].file) == str(snapshot)
        assert torch.equal(load_tensor(index.tensors[key]), tensor)
