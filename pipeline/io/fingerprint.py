"""What a tensor's bytes and a file's contents are, cheaply: the file's stat (size, mtime_ns,
inode) and the CRC-32C of a tensor's bytes. Shared by extract's resume (``extract/resume.py``:
reuse a result only for the bytes it was computed from) and the Python API (``apply/``: re-read
an original from the checkpoint only while it still holds it)."""

from __future__ import annotations

import os

import torch

from .crc32c import crc32c
from .maps import prefault
from .reader import TensorInfo, mapped


def file_stat(path: str) -> dict:
    """What a resume compares first: a file edited in place gets a new mtime, a replaced one a
    new inode."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def tensor_crc32c(tensor: torch.Tensor, crc: int | None = None) -> int:
    """CRC-32C of a host tensor's bytes in C order; a contiguous one (a mapped view) is hashed in
    place, without a copy. An empty tensor has the CRC of ``b""``. With ``crc`` (that of the
    bytes before these), the CRC of both together: a tensor can be hashed block by block.

    A mapped view's pages are faulted in first (``prefault``), so the hash runs at memory
    speed; neither holds the GIL (``crc32c.py``)."""
    if tensor.numel() == 0:
        return crc32c(b"", crc or 0)
    tensor = tensor.contiguous()
    prefault(tensor)
    return crc32c(tensor.reshape(-1).view(torch.uint8).numpy(), crc or 0)


def stored_crc32c(info: TensorInfo) -> int:
    """CRC-32C of the tensor's current bytes, read through the memory map."""
    with mapped(info) as view:
        return tensor_crc32c(view)
