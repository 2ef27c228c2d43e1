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

# The safetensors library refuses a header above 100 MB (``MAX_HEADER_SIZE``); so do we.
MAX_HEADER_BYTES = 100_000_000
ALIGNMENT = 8
_USIZE_LIMIT = 2**64  # shapes and offsets are u64 in the library: larger values are refused
_CORRUPT = "the file is corrupt; re-save it"
_TRUNCATED = "the file is truncated; re-download or re-save it"


def itemsize(code: str) -> int:
    return DTYPE_BY_CODE[code].itemsize


def nbytes(code: str, shape: Iterable[int]) -> int:
    return math.prod(shape) * itemsize(code)


def _is_count(value: object) -> bool:
    """A JSON integer that fits the library's ``usize`` (bools are not integers here)."""
    return type(value) is int and 0 <= value < _USIZE_LIMIT


def _refuse_json_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def parse_header(path: str, head: bytes, file_size: int) -> tuple[int, dict, dict]:
    """Validate a header and return (data_start, metadata, entries).

    ``head`` must hold at least the first ``8 + N`` bytes of the file. Entries map a key to
    ``(dtype_code, shape, begin, end)`` with begin/end absolute in the file.

    At least as strict as the safetensors library (Rust crate, ``safe_open``): UTF-8 JSON without
    NaN/Infinity; ``__metadata__`` absent, null or a str->str map; every entry an object with a
    known dtype, a shape of non-negative integers and two offsets spanning exactly
    ``nbytes(dtype, shape)``; and the entries, sorted by offsets, tile the data buffer exactly:
    the first starts at 0, each begins where the previous ends (no gap, no overlap), and the
    last ends at the end of the file. The library refuses gaps and trailing bytes as well, so
    nothing here is more lenient than it. Deliberately stricter: dtypes the library knows but
    ``DTYPE_BY_CODE`` lacks (U16, U32, U64, C64, F4, F8_E8M0, ...) are refused.
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
        # Decode explicitly: json.loads(bytes) would also accept UTF-16/32 and a UTF-8 BOM.
        text = head[8 : 8 + header_len].decode("utf-8")
        header = json.loads(text, parse_constant=_refuse_json_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, NaN
        reason = "nested too deeply" if isinstance(e, RecursionError) else getattr(e, "msg", e)
        raise CheckpointFormatError(
            f"header is not valid JSON ({reason})",
            path=path,
            hint=_CORRUPT,
        ) from None
    if not isinstance(header, dict):
        raise CheckpointFormatError("header is not a JSON object", path=path, hint=_CORRUPT)
    data_start = 8 + header_len
    data_size = file_size - data_start
    metadata = _parse_metadata(path, header.pop("__metadata__", None))
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        code, shape, begin, end = _parse_entry(path, key, entry)
        if end > data_size:
            raise CheckpointFormatError(
                f"data offsets [{begin}, {end}] run past the end of the data ({data_size} bytes)",
                path=path,
                key=key,
                hint=_TRUNCATED,
            )
        if end - begin != nbytes(code, shape):
            raise CheckpointFormatError(
                f"data offsets span {end - begin} bytes but {code}{list(shape)} needs "
                f"{nbytes(code, shape)}",
                path=path,
                key=key,
                hint=_CORRUPT,
            )
        entries[key] = (code, shape, data_start + begin, data_start + end)
        spans.append((begin, end, key))
    _check_tiling(path, spans, data_size)
    return data_start, metadata, entries


def _parse_metadata(path: str, metadata: object) -> dict[str, str]:
    """``__metadata__``: absent or null (as the library allows), else a str->str map."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise CheckpointFormatError(
            f"__metadata__ is a JSON {_json_type(metadata)}, not an object of strings",
            path=path,
            hint=_CORRUPT,
        )
    for name, value in metadata.items():
        if not isinstance(value, str):
            raise CheckpointFormatError(
                f"__metadata__ value of {name!r} is a JSON {_json_type(value)}, not a string",
                path=path,
                hint=_CORRUPT,
            )
    return metadata


def _parse_entry(path: str, key: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    """One tensor's (dtype code, shape, begin, end), offsets relative to the data buffer."""
    if not isinstance(entry, dict):
        raise CheckpointFormatError(
            f"header entry is a JSON {_json_type(entry)}, not an object with dtype, shape "
            "and data_offsets",
            path=path,
            key=key,
            hint=_CORRUPT,
        )
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise CheckpointFormatError(
                f"header entry has no {field!r}", path=path, key=key, hint=_CORRUPT
            )
    for field, value in entry.items():
        # The library ignores extra fields but its JSON parser stops at 127 nested levels (the
        # header object and this entry are two of them).
        if field not in ("dtype", "shape", "data_offsets") and 2 + _nesting(value) > 127:
            raise CheckpointFormatError(
                f"header entry field {field!r} is nested too deeply (the library allows 127 "
                "levels in all)",
                path=path,
                key=key,
                hint=_CORRUPT,
            )
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in DTYPE_BY_CODE:
        raise CheckpointFormatError(
            f"unsupported dtype {code!r}",
            path=path,
            key=key,
            hint=f"convert the tensor to one of {', '.join(DTYPE_BY_CODE)}",
        )
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise CheckpointFormatError(
            f"shape {json.dumps(shape)} is not a list of integers",
            path=path,
            key=key,
            hint=_CORRUPT,
        )
    if min(shape, default=0) < 0:
        raise CheckpointFormatError(
            f"shape {shape} has a negative dimension", path=path, key=key, hint=_CORRUPT
        )
    if max(shape, default=0) >= _USIZE_LIMIT:
        raise CheckpointFormatError(
            f"shape {shape} has a dimension above 2**64 - 1", path=path, key=key, hint=_CORRUPT
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CheckpointFormatError(
            f"data_offsets {json.dumps(offsets)} is not a pair of integers from 0 to 2**64 - 1",
            path=path,
            key=key,
            hint=_CORRUPT,
        )
    begin, end = offsets
    if begin > end:
        raise CheckpointFormatError(
            f"data offsets [{begin}, {end}] end before they begin",
            path=path,
            key=key,
            hint=_CORRUPT,
        )
    return code, tuple(shape), begin, end


def _check_tiling(path: str, spans: list[tuple[int, int, str]], data_size: int) -> None:
    """The spans, sorted by (begin, end) as the library sorts them, must tile [0, data_size):
    the library refuses gaps, overlaps and bytes after the last tensor alike."""
    pos, prev = 0, None
    for begin, end, key in sorted(spans):
        if begin < pos:
            raise CheckpointFormatError(
                f"data offsets [{begin}, {end}] overlap those of tensor '{prev[2]}' "
                f"[{prev[0]}, {prev[1]}]",
                path=path,
                key=key,
                hint=_CORRUPT,
            )
        if begin > pos:
            after = "the start of the data" if prev is None else f"tensor '{prev[2]}'"
            raise CheckpointFormatError(
                f"data offsets [{begin}, {end}] leave a gap of {begin - pos} bytes after {after}",
                path=path,
                key=key,
                hint=_CORRUPT,
            )
        pos, prev = end, (begin, end, key)
    if pos != data_size:
        if prev is None:
            message = f"the header names no tensors but the data holds {data_size} bytes"
        else:
            message = (
                f"{data_size - pos} bytes after this tensor's data belong to no tensor "
                f"(the header covers {pos} of {data_size} data bytes)"
            )
        raise CheckpointFormatError(
            message, path=path, key=None if prev is None else prev[2], hint=_CORRUPT
        )


def _nesting(value: object) -> int:
    """How many arrays/objects deep ``value`` is (0 for a scalar)."""
    depth, level = 0, [value]
    while level := [v for v in level if isinstance(v, (dict, list))]:
        depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number"}
    return "null" if value is None else names.get(type(value), "number")


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
