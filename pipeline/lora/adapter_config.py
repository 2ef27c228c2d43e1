"""The LoRA config PEFT and diffusers scale by, both ways: built from a written LoRA's ranks and
alphas (PEFT's ``adapter_config.json``; diffusers' ``lora_adapter_metadata`` header entry, the
same fields prefixed with ``transformer.``), and read back from a diffusers file's header.

Every module gets scale = alpha / rank exactly: the most common rank and alpha are ``r`` and
``lora_alpha``; other modules are listed in ``rank_pattern`` / ``alpha_pattern`` under their
full name, escaped (PEFT matches a pattern as ``(.*\\.)?<pattern>$``)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence

from ..errors import CheckpointFormatError
from ..io import safetensors_format as stf
from ..io.reader import CheckpointIndex
from .keys import PeftConfig, peft_config_from

METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
DIFFUSERS_PREFIX = "transformer."


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values: list) -> object:
    counts = Counter(values)
    return max(sorted(counts), key=lambda v: counts[v])  # ties: the smallest


def build_config(modules: Sequence[tuple[str, int, float]]) -> dict:
    """A PEFT LoRA config for ``(module, rank, alpha)`` triples."""
    r = _most_common([rank for _, rank, _ in modules]) if modules else 1
    alpha = _most_common([a for _, _, a in modules]) if modules else r
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(m for m, _, _ in modules),
        "rank_pattern": {re.escape(m): k for m, k, _ in sorted(modules) if k != r},
        "alpha_pattern": {re.escape(m): _number(a) for m, _, a in sorted(modules) if a != alpha},
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def diffusers_metadata(config: dict) -> str:
    """The header entry diffusers' pipeline loaders read (``save_lora_weights``' format)."""
    prefixed = {DIFFUSERS_PREFIX + k: v for k, v in config.items()}
    return json.dumps(prefixed, indent=2, sort_keys=True)


def header_config(index: CheckpointIndex) -> PeftConfig | None:
    """The scaling a diffusers LoRA file keeps in its header, if it has one."""
    files = sorted({i.file for i in index.tensors.values() if i.file.endswith(".safetensors")})
    if not files:
        return None
    _start, metadata, _entries, _head = stf.read_header(files[0])
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return None
    where = f"{files[0]} (header {METADATA_KEY})"
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"not JSON: {e}", path=where) from None
    return peft_config_from(_denoiser_section(config), where)


def _denoiser_section(config: object) -> object:
    """A pipeline's LoRA config (diffusers' ``save_lora_weights``) holds one section per model,
    its keys prefixed ``transformer.``, ``unet.``, ``text_encoder.``, ...; diffusers scales each
    model by its own section, and the denoiser's is the one a merge into it uses. A model's own
    config (``save_lora_adapter``) has no prefix and is taken whole."""
    if not isinstance(config, dict):
        return config
    for prefix in (DIFFUSERS_PREFIX, "unet."):
        if any(k.startswith(prefix) for k in config):
            return {k.removeprefix(prefix): v for k, v in config.items() if k.startswith(prefix)}
    return config
