"""CRC-32C of a buffer without holding the GIL.

google_crc32c releases the GIL only for ``bytes`` of 1 MB or more; a view of a tensor's memory
(a block just made, a mapped view) is hashed with the GIL held, so every other thread of a run
waits on it (py-spy --gil: 0.13 s of a 1.3B-shaped merge's 2.5 s, two tasks and the writer
thread taking turns). Its C library's ``crc32c_extend`` called through ctypes hashes any
contiguous buffer with the GIL released, at the same speed. Where that symbol cannot be found
(a build of google_crc32c without its C extension), google_crc32c itself is called."""

from __future__ import annotations

import ctypes
import functools

import google_crc32c
import numpy as np


@functools.cache
def _c_extend():
    """``crc32c_extend(crc, data, size)`` of the library google_crc32c's extension links, or
    None."""
    try:
        from google_crc32c import _crc32c  # the C extension; dlsym searches what it links

        extend = ctypes.CDLL(_crc32c.__file__).crc32c_extend
    except (ImportError, OSError, AttributeError):
        return None
    extend.restype = ctypes.c_uint32
    extend.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    return extend


def crc32c(data: bytes | memoryview | np.ndarray, previous: int = 0) -> int:
    """CRC-32C of ``data`` (contiguous bytes; ``previous``: that of the bytes before them)."""
    array = data if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    if not array.flags.c_contiguous:
        raise ValueError("crc32c: the bytes must be contiguous")
    extend = _c_extend()
    if extend is None:
        return google_crc32c.extend(previous, array)
    return extend(previous, array.ctypes.data, array.nbytes)
