"""What a tensor's bytes and a file's contents are, cheaply: the file's stat (size, mtime_ns,
inode) and the CRC-32C of a tensor's bytes. Shared by extract's resume (``extract/resume.py``:
reuse a result only for the bytes it was computed from) and the Python API (``apply/``: re-read
an original from the checkpoint only while it still holds it)."""

from __future__ import annotations

import os

import google_crc32c
import torch

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

    google_crc32c holds the GIL over anything but ``bytes``, so a mapped view's pages are
    faulted in first, outside it (``prefault``): the GIL is then held only while hashing at
    memory speed, not while reading from the page cache or the disk."""
    if tensor.numel() == 0:
        return google_crc32c.value(b"") if crc is None else crc
    tensor = tensor.contiguous()
    prefault(tensor)
    data = tensor.reshape(-1).view(torch.uint8).numpy()
    return google_crc32c.value(data) if crc is None else google_crc32c.extend(crc, data)


def stored_crc32c(info: TensorInfo) -> int:
    """CRC-32C of the tensor's current bytes, read through the memory map."""
    with mapped(info) as view:
        return tensor_crc32c(view)
