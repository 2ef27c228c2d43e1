"""Which LoRAs a merge applies, at which strengths: from ``--lora-model``/``--strength`` or from
a ``--config`` JSON file in one of LightX2V's inference-config shapes::

    {"lora_path": ["a.safetensors", "b.safetensors"], "strength_model": 1.0}
    {"lora_configs": [{"path": "a.safetensors", "strength": 0.8, "alpha": null}, ...]}

``alpha`` in a ``lora_configs`` entry is LightX2V's loader's: for a LoRA without ``.alpha``
keys, its modules are scaled by alpha / rank. Relative paths are resolved against the config
file's directory. Unknown fields are refused, never dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from ..errors import CheckpointNotFound, UsageError

_ENTRY_FIELDS = ("path", "strength", "alpha")
_SHAPES = "{'lora_path': [...], 'strength_model': 1.0} or {'lora_configs': [{'path', 'strength'}]}"


def _number(value: object, what: str, where: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{what} must be a finite number, got {value!r}", path=where)
    return float(value)


@dataclass(frozen=True)
class LoraSpec:
    path: str
    strength: float = 1.0
    alpha: float | None = None  # LightX2V's per-LoRA alpha, used where the file has none

    def to_dict(self) -> dict:
        data: dict = {"path": self.path, "strength": self.strength}
        if self.alpha is not None:
            data["alpha"] = self.alpha
        return data


@dataclass(frozen=True)
class MergeConfig:
    loras: tuple[LoraSpec, ...]
    path: str | None = field(default=None, compare=False)  # the file it was read from

    def to_dict(self) -> dict:
        """The ``lora_configs`` shape, which ``from_dict`` reads back to an equal config."""
        return {"lora_configs": [spec.to_dict() for spec in self.loras]}

    @classmethod
    def from_dict(
        cls, data: object, *, where: str | None = None, base_dir: str = "."
    ) -> MergeConfig:
        """Either LightX2V shape; relative paths are joined to ``base_dir``."""
        if not isinstance(data, dict):
            raise UsageError(f"a merge config must be a JSON object: {_SHAPES}", path=where)
        if "lora_path" not in data and "lora_configs" not in data:
            raise UsageError(f"the config names no LoRA; expected {_SHAPES}", path=where)
        if "lora_path" in data and "lora_configs" in data:
            raise UsageError("give either 'lora_path' or 'lora_configs', not both", path=where)
        valid = ("lora_configs",) if "lora_configs" in data else ("lora_path", "strength_model")
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise UsageError(
                f"unknown field(s) {', '.join(unknown)}; valid: {', '.join(valid)}",
                path=where,
                hint="loraforge merge reads only the LoRA part of a LightX2V config",
            )
        if "lora_configs" in data:
            entries = data["lora_configs"]
            if not isinstance(entries, list):
                raise UsageError("'lora_configs' must be a list of objects", path=where)
            specs = [_entry(e, i, where, base_dir) for i, e in enumerate(entries)]
        else:
            paths = data.get("lora_path")
            paths = [paths] if isinstance(paths, str) else paths
            if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
                raise UsageError("'lora_path' must be a path or a list of paths", path=where)
            strength = _number(data.get("strength_model", 1.0), "'strength_model'", where)
            specs = [LoraSpec(_resolve(p, base_dir), strength) for p in paths]
        if not specs:
            raise UsageError("the config names no LoRA", path=where)
        return cls(tuple(specs))


def _entry(entry: object, i: int, where: str | None, base_dir: str) -> LoraSpec:
    what = f"lora_configs[{i}]"
    if not isinstance(entry, dict):
        raise UsageError(f"{what} must be an object with 'path' and 'strength'", path=where)
    unknown = sorted(set(entry) - set(_ENTRY_FIELDS))
    if unknown:
        raise UsageError(
            f"{what}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(_ENTRY_FIELDS)}",
            path=where,
        )
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        raise UsageError(f"{what}: 'path' must be a non-empty string", path=where)
    strength = _number(entry.get("strength", 1.0), f"{what}: 'strength'", where)
    alpha = entry.get("alpha")
    alpha = None if alpha is None else _number(alpha, f"{what}: 'alpha'", where)
    return LoraSpec(_resolve(path, base_dir), strength, alpha)


def _resolve(path: str, base_dir: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def load_merge_config(path: str, *, check_files: bool = True) -> MergeConfig:
    """Read ``path``; with ``check_files`` every LoRA it names must exist."""
    where = os.path.abspath(os.path.expanduser(path))
    try:
        with open(where, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointNotFound("merge config not found", path=where) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"not a readable JSON file ({e})", path=where) from None
    config = MergeConfig.from_dict(data, where=where, base_dir=os.path.dirname(where))
    config = dataclasses.replace(config, path=where)
    if check_files:
        for spec in config.loras:
            if not os.path.exists(spec.path):
                raise CheckpointNotFound(
                    f"names a LoRA that does not exist: {spec.path}",
                    path=where,
                    hint="fix the path; relative paths are read from the config's directory",
                )
    return config


def config_from_options(paths: list[str], strengths: list[str]) -> MergeConfig:
    """``--lora-model`` (repeatable) with ``--strength`` (none, or one per LoRA)."""
    if not paths:
        raise UsageError("no LoRA given", hint="pass --lora-model (repeatable) or --config")
    if strengths and len(strengths) != len(paths):
        raise UsageError(
            f"{len(strengths)} --strength value(s) for {len(paths)} --lora-model(s)",
            hint="give one --strength per --lora-model, in the same order, or none for 1.0",
        )
    values = [parse_number(s, "--strength") for s in strengths] or [1.0] * len(paths)
    return MergeConfig(
        tuple(
            LoraSpec(os.path.abspath(os.path.expanduser(p)), v)
            for p, v in zip(paths, values, strict=True)
        )
    )


def parse_number(text: str, option: str) -> float:
    """A finite float from an option's text, or a one-line usage error."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"{option} must be finite, got {text!r}")
    return value
