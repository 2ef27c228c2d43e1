"""Option values every command that writes tensors shares: output dtypes, formats and sizes."""

from __future__ import annotations

import re

import torch

from ..errors import UsageError

OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# merge only: a scaled-fp8 checkpoint (fp8 weights, fp32 scales) in the base's own convention.
# e4m3fn only: ComfyUI's scaled_fp8 loader labels every legacy layer float8_e4m3fn
# (comfy/utils.py convert_old_quants) and LightX2V's converter writes e4m3fn alone.
FP8_OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
OUTPUT_FORMATS = ("safetensors", "pytorch")
_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "PIB": 2**50,
}


def parse_dtype(name: str, fp8: bool = False) -> torch.dtype:
    """An ``--output-dtype`` value; ``fp8`` also accepts the scaled-fp8 names (merge)."""
    names = {**OUTPUT_DTYPES, **FP8_OUTPUT_DTYPES} if fp8 else OUTPUT_DTYPES
    try:
        return names[name.lower()]
    except KeyError:
        hint = "" if fp8 or name.lower() not in FP8_OUTPUT_DTYPES else " (fp8 output: merge only)"
        raise UsageError(f"unknown dtype {name!r}{hint}; valid: {', '.join(names)}") from None


def size_in_bytes(text: str) -> int:
    """'5GB' → 5·10⁹ bytes (Hugging Face's convention), '2GiB' → 2·2³⁰, '0' → 0; text that
    is no size is a usage error."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise UsageError(f"cannot read size {text!r}; write e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def parse_size(text: str | int | None) -> int | None:
    """``size_in_bytes``; None → no limit. A size under one byte is refused rather than read
    as "no limit"."""
    if text is None:
        return None
    size = text if isinstance(text, int) else size_in_bytes(text)
    if size < 1:
        raise UsageError(
            f"--max-shard-size {text} is less than one byte",
            hint="give e.g. 5GB, or leave --max-shard-size out for one file",
        )
    return size


def check_output_format(output_format: str, max_shard_size: int | None) -> None:
    if output_format not in OUTPUT_FORMATS:
        raise UsageError(
            f"unknown --output-format {output_format!r}; valid: {', '.join(OUTPUT_FORMATS)}"
        )
    if output_format == "pytorch" and max_shard_size:
        raise UsageError("--max-shard-size needs --output-format safetensors")
