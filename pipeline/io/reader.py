"""The one module that reads checkpoints.

``index_checkpoint`` reads headers only and returns where every tensor lives. ``load_tensor``
reads one tensor through a memory map cached per process (``maps.py``: so Dask tasks open files
themselves and tensors never travel through the scheduler), copies it out and then drops the
mapped pages from the process, so resident memory stays bounded by the tensors in flight
however much of the checkpoint has been read.

Formats: a single ``.safetensors`` file; a directory of shards with or without
``*.safetensors.index.json`` (an index is the truth: a shard it names must exist); PyTorch
``.pt``/``.pth`` zip checkpoints through ``torch.load(mmap=True, weights_only=True)``, unwrapping
``state_dict``/``model``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from loraforge.stages.quantize import dequantize

from ..errors import CheckpointFormatError, CheckpointNotFound
from . import safetensors_format as stf
from .fp8 import Fp8Layout, find_layout, join_metadata
from .maps import file_map, pytorch_state, release

FORMATS = ("safetensors", "pytorch")
PYTORCH_SUFFIXES = (".pt", ".pth", ".bin")  # .bin: Hugging Face / PEFT torch.save zips


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. ``offset`` is the absolute byte offset (safetensors only);
    ``scale``: for a scaled-fp8 weight, where its scale lives (``W = W_fp8 · scale``, io/fp8.py),
    so a task opens both."""

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int | None = None
    scale: TensorInfo | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * stf.itemsize(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype in stf.FLOAT_CODES


@dataclass(frozen=True)
class CheckpointIndex:
    """Headers of a whole checkpoint: tensors by key, and a cheap fingerprint per file;
    ``fp8``: its scaled-fp8 bookkeeping (which tensor scales which weight)."""

    path: str
    format: str
    tensors: dict[str, TensorInfo]
    files: dict[str, dict]  # file name -> {"size": int, "header_sha256": str}
    fp8: Fp8Layout = field(default_factory=Fp8Layout)

    def fingerprint(self) -> dict:
        return {"path": self.path, "format": self.format, "files": self.files}


def index_checkpoint(path: str, fmt: str | None = None) -> CheckpointIndex:
    """Read the headers of the checkpoint at ``path`` (format ``fmt`` or guessed)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise CheckpointNotFound("no such file or directory", path=path, hint="check the path")
    if fmt is None:
        fmt = "pytorch" if path.endswith(PYTORCH_SUFFIXES) else "safetensors"
    if fmt == "safetensors":
        if os.path.isdir(path):
            return _index_safetensors_dir(path)
        if not path.endswith(".safetensors"):
            raise CheckpointFormatError(
                "a safetensors checkpoint must end with .safetensors or be a directory of shards",
                path=path,
                hint="pass the right --*-type (pytorch for .pt/.pth/.bin)",
            )
        return _index_safetensors_files(path, [path])
    if fmt == "pytorch":
        if os.path.isdir(path) or not path.endswith(PYTORCH_SUFFIXES):
            raise CheckpointFormatError(
                "a pytorch checkpoint must be a .pt, .pth or .bin file",
                path=path,
                hint="pass the right --*-type (safetensors for .safetensors files)",
            )
        return _index_pytorch(path)
    raise CheckpointFormatError(
        f"unknown checkpoint format {fmt!r}; use one of {FORMATS}", path=path
    )


def _index_safetensors_dir(path: str) -> CheckpointIndex:
    names = sorted(os.listdir(path))
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        raise CheckpointFormatError(
            f"several shard indexes: {', '.join(indexes)}",
            path=path,
            hint="keep one *.safetensors.index.json per directory",
        )
    if indexes:
        index_path = os.path.join(path, indexes[0])
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointFormatError(
                "not a valid shard index (needs a 'weight_map' object)", path=index_path
            ) from None
        weight_map = {key: _shard_name(index_path, key, shard) for key, shard in weight_map.items()}
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(path, shard)):
                raise CheckpointNotFound(
                    f"shard {shard!r} named by the index is missing",
                    path=index_path,
                    hint="re-download the missing shard",
                )
        index = _index_safetensors_files(path, [os.path.join(path, s) for s in shards])
        for key, shard in weight_map.items():
            info = index.tensors.get(key)
            if info is None or os.path.basename(info.file) != shard:
                raise CheckpointFormatError(
                    f"the index places this tensor in {shard!r}, which does not hold it",
                    path=index_path,
                    key=key,
                )
        return index
    files = [os.path.join(path, n) for n in names if n.endswith(".safetensors")]
    if not files:
        raise CheckpointNotFound(
            "directory holds no .safetensors files",
            path=path,
            hint="point at the checkpoint file or its shard directory",
        )
    return _index_safetensors_files(path, files)


def _shard_name(index_path: str, key: str, shard: object) -> str:
    """A ``weight_map`` value as a plain file name in the checkpoint directory (``./a`` -> ``a``).

    Absolute names and names that leave the directory through ``..`` are refused, and so are
    subdirectories (shards are identified by file name). Only the name is checked, never where a
    file resolves to: Hugging Face's cache stores shards as symlinks into ``../../blobs``.
    """
    if not isinstance(shard, str):
        raise CheckpointFormatError(
            f"the index places this tensor in {json.dumps(shard)}, which is not a file name",
            path=index_path,
            key=key,
            hint="each weight_map value must be the name of a shard file in this directory",
        )
    name = os.path.normpath(shard) if shard else ""
    if os.path.isabs(shard):
        raise CheckpointFormatError(
            f"the index places this tensor in {shard!r}, an absolute path, not a file name in "
            "the checkpoint directory",
            path=index_path,
            key=key,
            hint="shards must sit in the checkpoint directory; fix the index or move the shard",
        )
    if name == ".." or name.startswith(".." + os.sep):
        raise CheckpointFormatError(
            f"the index places this tensor in {shard!r}, outside the checkpoint directory",
            path=index_path,
            key=key,
            hint="shards must sit in the checkpoint directory; fix the index or move the shard",
        )
    if name in ("", ".") or os.sep in name or "\0" in name:
        raise CheckpointFormatError(
            f"the index places this tensor in {shard!r}, which is not a file name in the "
            "checkpoint directory",
            path=index_path,
            key=key,
            hint="shards must sit in the checkpoint directory; fix the index or move the shard",
        )
    return name


def _index_safetensors_files(root: str, files: list[str]) -> CheckpointIndex:
    tensors: dict[str, TensorInfo] = {}
    fingerprints: dict[str, dict] = {}
    headers: list[dict[str, str]] = []
    for file in files:
        _, file_metadata, entries, head = stf.read_header(file)
        headers.append(file_metadata)
        fingerprints[os.path.basename(file)] = {
            "size": os.path.getsize(file),
            "header_sha256": hashlib.sha256(head).hexdigest(),
        }
        for key, (code, shape, begin, _end) in entries.items():
            if key in tensors:
                raise CheckpointFormatError(
                    f"tensor also stored in {os.path.basename(tensors[key].file)}",
                    path=file,
                    key=key,
                    hint="remove the duplicate shard",
                )
            tensors[key] = TensorInfo(key, file, code, shape, begin)
    index = CheckpointIndex(root, "safetensors", tensors, fingerprints)
    return with_scales(index, join_metadata(root, headers))


def with_scales(index: CheckpointIndex, metadata: dict[str, str]) -> CheckpointIndex:
    """``index`` with its scaled-fp8 layout found and each scaled weight pointing at its
    scale (shards: the metadata of all files together)."""
    layout = find_layout(index.path, index.tensors, metadata)
    if layout.convention is None:
        return index
    tensors = dict(index.tensors)
    for weight, scale in layout.scales.items():
        tensors[weight] = replace(tensors[weight], scale=tensors[scale])
    return replace(index, tensors=tensors, fp8=layout)


def _index_pytorch(path: str) -> CheckpointIndex:
    state = pytorch_state(path)
    tensors = {}
    for key, t in state.items():
        if t.dtype not in stf.CODE_BY_DTYPE:
            raise CheckpointFormatError(f"unsupported dtype {t.dtype}", path=path, key=key)
        tensors[key] = TensorInfo(key, path, stf.CODE_BY_DTYPE[t.dtype], tuple(t.shape))
    with zipfile.ZipFile(path) as z:
        pickle_name = next(n for n in z.namelist() if n.endswith("data.pkl"))
        digest = hashlib.sha256(z.read(pickle_name)).hexdigest()
    files = {os.path.basename(path): {"size": os.path.getsize(path), "header_sha256": digest}}
    return with_scales(CheckpointIndex(path, "pytorch", tensors, files), {})


def _view(info: TensorInfo) -> torch.Tensor:
    """A zero-copy view of the stored tensor (valid until its pages are dropped)."""
    if info.offset is None:
        return pytorch_state(info.file)[info.key]
    dtype = stf.DTYPE_BY_CODE[info.dtype]
    if info.numel == 0:
        return torch.empty(info.shape, dtype=dtype)
    with warnings.catch_warnings():  # read-only map: we never write through the view
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(
            file_map(info.file), dtype=dtype, count=info.numel, offset=info.offset
        )
    return flat.view(info.shape)


def load_tensor(info: TensorInfo, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Copy one tensor out of its checkpoint, converted to ``dtype`` (default: as stored). A
    scaled-fp8 weight comes back as stored: ``load_weight`` applies its scale."""
    with mapped(info) as view:
        result = torch.empty(view.shape, dtype=view.dtype if dtype is None else dtype)
        return result.copy_(view)


def load_weight(info: TensorInfo) -> torch.Tensor:
    """One weight's value in fp32: a scaled-fp8 weight dequantized (``W_fp8 · scale``), any
    other float tensor upcast exactly."""
    if info.scale is None:
        return load_tensor(info, torch.float32)
    with mapped(info) as view:
        return dequantize(view, load_tensor(info.scale))


def dequantized(info: TensorInfo, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``tensor`` (``info``'s values, read) as its weight's value: dequantized into ``out``
    (fp32) when ``info`` is a scaled-fp8 weight, else ``tensor`` itself."""
    if info.scale is None:
        return tensor
    return dequantize(tensor, load_tensor(info.scale), out=out)


@contextmanager
def mapped(info: TensorInfo):
    """A zero-copy view of the stored tensor for the duration of the block; its pages are
    dropped from the process afterwards. Copy out anything you keep."""
    view = _view(info)
    try:
        yield view
    finally:
        release(view)
