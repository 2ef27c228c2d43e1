"""The original bytes of the weights an ``apply()`` handle patches, remembered once per storage:
two names of one tensor (tied weights, ``m[1].weight = m[0].weight``) are one original, taken
before either is written.

An original is a copy (on the weight's device, or on the CPU), or, where ``checkpoint`` (the
file the model was loaded from) holds the same bytes, that tensor's address in the file. The
file is fingerprinted at ``apply()`` (each file's size, mtime and inode, ``io/fingerprint.py``)
and each tensor read from it by the CRC-32C of its bytes; before an original is read back the
file is checked: unchanged stat, or a re-hash matching the CRC (the stat it matched at is then
the one compared). A changed or missing file is an error before anything is written (the model
stays as it is) and ``use_checkpoint(path)`` points the handle at a file that holds the
originals (each checked by its CRC) to go on."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from ..errors import OriginalsChanged, OriginalsGone
from ..io.fingerprint import file_stat, stored_crc32c, tensor_crc32c
from ..io.reader import CheckpointIndex, TensorInfo, index_checkpoint, load_tensor

Storage = tuple  # what identifies a tensor's memory: two names of one tensor share it
FIX = "the model is left as it is; handle.use_checkpoint(path) takes a file holding them"


def storage_of(tensor: torch.Tensor) -> Storage:
    """The memory ``tensor`` is: its device, storage, offset, shape, strides and dtype."""
    if tensor.numel() == 0:
        return ("empty", id(tensor))  # empty tensors share data pointer 0
    return (
        str(tensor.device),
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


@dataclass(frozen=True)
class Stored:
    """An original kept as its address in the checkpoint, with the CRC-32C of its bytes and the
    file's stat when they last matched it (a file touched but not changed is re-hashed once)."""

    info: TensorInfo
    crc: int
    stat: dict


class Originals:
    """The originals of one handle, by storage."""

    def __init__(self, keep_on: str, checkpoint: str | os.PathLike | CheckpointIndex | None):
        self.keep_on = keep_on
        self.copies: dict[Storage, torch.Tensor] = {}
        self.stored: dict[Storage, Stored] = {}
        self.checkpoint: CheckpointIndex | None = None
        self.stats: dict[str, dict] = {}
        if checkpoint is not None:
            self._index(checkpoint)

    def _index(self, checkpoint: str | os.PathLike | CheckpointIndex) -> None:
        """The checkpoint's index (an index given as it is: its tensors under the model's
        names) and each of its files' stat, taken now."""
        if not isinstance(checkpoint, CheckpointIndex):
            checkpoint = index_checkpoint(os.fspath(checkpoint))
        self.checkpoint = checkpoint
        files = {info.file for info in self.checkpoint.tensors.values()}
        self.stats = {file: file_stat(file) for file in sorted(files)}

    def __contains__(self, storage: Storage) -> bool:
        return storage in self.copies or storage in self.stored

    @property
    def held_bytes(self) -> int:
        return sum(copy.nbytes for copy in self.copies.values())

    def remember(self, storage: Storage, name: str, weight: torch.Tensor) -> None:
        """Keep ``weight``'s bytes, before anything writes it: its address in the checkpoint
        where the file is as fingerprinted and holds them (or bytes whose cast to the weight's
        dtype are the weight's, as a model's loader casts them), else a copy."""
        if storage in self:
            return
        info = self.checkpoint.tensors.get(name) if self.checkpoint else None
        usable = info is not None and info.is_float and info.scale is None
        if usable and info.shape == tuple(weight.shape) and self._unchanged(info.file):
            stored = load_tensor(info)
            if _same_bytes(stored.to(weight.dtype), weight.detach().cpu()):
                self.stored[storage] = Stored(info, tensor_crc32c(stored), self.stats[info.file])
                return
        device = "cpu" if self.keep_on == "cpu" else weight.device
        self.copies[storage] = weight.detach().to(device, copy=True)

    def forget(self, storage: Storage) -> None:
        self.copies.pop(storage, None)
        self.stored.pop(storage, None)

    def load(self, storage: Storage, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The original, on ``device`` in the weight's ``dtype`` (a stored one cast as the
        model's loader cast it)."""
        if storage in self.copies:
            return self.copies[storage].to(device)
        return load_tensor(self.stored[storage].info).to(device, dtype)

    def check(self, storages: Iterable[Storage]) -> None:
        """Before any original of ``storages`` is read back: each one kept as an address must
        still be in its file (unchanged stat, or bytes matching its CRC-32C)."""
        for storage in storages:
            stored = self.stored.get(storage)
            if stored is None:
                continue
            info = stored.info
            stat = _stat(info.file)
            if stat == stored.stat:
                continue
            if not os.path.exists(info.file):
                raise OriginalsGone(
                    "the checkpoint holding the originals is gone", path=info.file, hint=FIX
                )
            if _crc(info) != stored.crc:
                raise OriginalsChanged(
                    "no longer holds the original bytes read at apply(): the file changed",
                    path=info.file,
                    key=info.key,
                    hint=FIX,
                )
            if stat is not None:  # taken before the hash: a later change shows in it
                self.stored[storage] = replace(stored, stat=stat)

    def use_checkpoint(self, path: str | os.PathLike) -> None:
        """Re-read the originals kept as addresses from ``path`` from now on: every one must
        be there under its name, with the dtype, shape and CRC-32C of the bytes read at
        ``apply()``; otherwise nothing changes."""
        previous = (self.checkpoint, self.stats)
        self._index(os.fspath(path))
        moved = {}
        try:
            for storage, stored in self.stored.items():
                info = self.checkpoint.tensors.get(stored.info.key)
                same = info is not None and (info.dtype, info.shape) == (
                    stored.info.dtype,
                    stored.info.shape,
                )
                if not same or _crc(info) != stored.crc:
                    raise OriginalsChanged(
                        "does not hold the original bytes read at apply()",
                        path=self.checkpoint.path,
                        key=stored.info.key,
                        hint="give the file the model was loaded from",
                    )
                moved[storage] = Stored(info, stored.crc, self.stats[info.file])
        except BaseException:
            self.checkpoint, self.stats = previous
            raise
        self.stored.update(moved)

    def _unchanged(self, file: str) -> bool:
        """Whether ``file`` has the stat taken when the checkpoint was indexed."""
        return file in self.stats and _stat(file) == self.stats[file]


def _stat(file: str) -> dict | None:
    try:
        return file_stat(file)
    except OSError:
        return None


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (``torch.equal`` calls -0.0 and 0.0, or two NaNs, what they are not)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = torch.uint8
    return torch.equal(a.contiguous().reshape(-1).view(view), b.contiguous().reshape(-1).view(view))


def _crc(info: TensorInfo) -> int | None:
    """The CRC-32C of a tensor's bytes now, or None when they cannot be read."""
    try:
        return stored_crc32c(info)
    except (OSError, ValueError, RuntimeError, KeyError):  # gone, truncated, another layout
        return None
