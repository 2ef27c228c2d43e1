"""The safetensors container: dtype codes, header parsing with validation, header encoding.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the data buffer. Each entry
is ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the buffer; entries cover
the buffer without gaps. ``__metadata__`` holds string pairs.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable

import torch

from ..errors import CheckpointFormatError

DTYPE_BY_CODE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODE_BY_DTYPE: dict[torch.dtype, str] = {v: k for k, v in DTYPE_BY_CODE.items()}
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

# A header above this is certainly corrupt (real ones are a few MB at most).
MAX_HEADER_BYTES = 100 * 1024 * 1024
ALIGNMENT = 8


def itemsize(code: str) -> int:
    return DTYPE_BY_CODE[code].itemsize


def nbytes(code: str, shape: Iterable[int]) -> int:
    return math.prod(shape) * itemsize(code)


def parse_header(path: str, head: bytes, file_size: int) -> tuple[int, dict, dict]:
    """Validate a header and return (data_start, metadata, entries).

    ``head`` must hold at least the first ``8 + N`` bytes of the file. Entries map a key to
    ``(dtype_code, shape, begin, end)`` with begin/end absolute in the file.
    """
    if file_size < 8 or len(head) < 8:
        raise CheckpointFormatError(
            "file is too short to be safetensors (truncated?)",
            path=path,
            hint="re-download or re-save the checkpoint",
        )
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
        raise CheckpointFormatError(
            f"bad header length {header_len} for a file of {file_size} bytes "
            "(truncated or not safetensors)",
            path=path,
            hint="re-download or re-save the checkpoint",
        )
    try:
        header = json.loads(head[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(
            f"header is not valid JSON ({e.msg if hasattr(e, 'msg') else e})",
            path=path,
            hint="the file is corrupt; re-save it",
        ) from None
    if not isinstance(header, dict):
        raise CheckpointFormatError("header is not a JSON object", path=path)
    data_start = 8 + header_len
    data_size = file_size - data_start
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for key, entry in header.items():
        try:
            code = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError("malformed header entry", path=path, key=key) from None
        if code not in DTYPE_BY_CODE:
            raise CheckpointFormatError(f"unsupported dtype {code!r}", path=path, key=key)
        if end > data_size or begin > end:
            raise CheckpointFormatError(
                f"data offsets [{begin}, {end}] run past the end of the data ({data_size} bytes)",
                path=path,
                key=key,
                hint="the file is truncated; re-download or re-save it",
            )
        if end - begin != nbytes(code, shape):
            raise CheckpointFormatError(
                f"data offsets span {end - begin} bytes but {code}{list(shape)} needs "
                f"{nbytes(code, shape)}",
                path=path,
                key=key,
                hint="the file is corrupt",
            )
        entries[key] = (code, shape, data_start + begin, data_start + end)
    return data_start, metadata, entries


def read_header(path: str) -> tuple[int, dict, dict, bytes]:
    """Read and validate the header of ``path``; also return the raw header bytes."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)
        prefix = f.read(8)
        head = prefix
        if len(prefix) == 8:
            (n,) = struct.unpack("<Q", prefix)
            if n <= MAX_HEADER_BYTES:
                head = prefix + f.read(n)
    data_start, metadata, entries = parse_header(path, head, size)
    return data_start, metadata, entries, head


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[tuple[int, int]]]:
    """Header bytes (length prefix included) and each entry's absolute [begin, end) offsets.

    Entries are laid out back to back in the given order; the JSON is padded with spaces so the
    data buffer starts on an 8-byte boundary.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offsets = []
    pos = 0
    for key, code, shape in entries:
        size = nbytes(code, shape)
        header[key] = {"dtype": code, "shape": list(shape), "data_offsets": [pos, pos + size]}
        offsets.append((pos, pos + size))
        pos += size
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % ALIGNMENT)
    data_start = 8 + len(body)
    return struct.pack("<Q", len(body)) + body, [
        (data_start + b, data_start + e) for b, e in offsets
    ]
