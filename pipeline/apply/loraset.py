"""A list of LoRAs and their strengths, from the sources the CLI takes."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ArgumentTypeError
from ..lora.config import LoraSpec, load_merge_config
from ..lora.numbers import checked, is_number


@dataclass(frozen=True)
class LoraSet:
    """LoRAs in order, each a file, shard directory or PEFT adapter directory in any naming
    ``loraforge merge`` reads, with its strength.

    ``LoraSet([("a.safetensors", 0.8), "peft_dir/"])`` (a bare path has strength 1.0), or
    ``LoraSet.from_config("lora.json")`` for LightX2V's ``lora_configs`` and
    ``lora_path`` + ``strength_model`` shapes, a whole inference config included."""

    specs: tuple[LoraSpec, ...]

    def __init__(self, loras: Iterable[str | os.PathLike | tuple | LoraSpec] = ()):
        object.__setattr__(self, "specs", tuple(_spec(item) for item in loras))

    @classmethod
    def from_config(cls, path: str | os.PathLike, name: str | None = None) -> LoraSet:
        """``name``: the entries whose ``"name"`` is ``name`` (Wan2.2 MoE's
        ``high_noise_model`` / ``low_noise_model``); required when entries are named."""
        return cls(load_merge_config(str(path), name=name).loras)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def strengths(self) -> list[float]:
        return [spec.strength for spec in self.specs]


def strength_value(value: object, label: object) -> float:
    """A strength given to the Python API: a number (else ``ArgumentTypeError``), finite and
    within float32's range (``lora/numbers.py``)."""
    if not is_number(value):
        raise ArgumentTypeError(f"strength of {label} must be a number, got {value!r}")
    return checked(value, f"strength of {label}")


def _spec(item) -> LoraSpec:
    if isinstance(item, LoraSpec):
        strength_value(item.strength, item.path)
        return item
    if isinstance(item, (str, os.PathLike)):
        return LoraSpec(_absolute(item))
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, os.PathLike)):
        path, strength = item
        return LoraSpec(_absolute(path), strength_value(strength, path))
    raise ArgumentTypeError(f"a LoRA is a path or (path, strength), got {item!r}")


def _absolute(path) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))
