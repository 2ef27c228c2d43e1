"""Which LoRAs a merge applies, at which strengths: from ``--lora-model``/``--strength`` or from
a ``--config`` JSON file, which may be a whole LightX2V inference config::

    {"infer_steps": 4, ..., "lora_configs": [{"path": "a.safetensors", "strength": 0.8}]}
    {"lora_configs": [{"name": "high_noise_model", "path": ..., "strength": 1.0}, ...]}
    {"lora_path": ["a.safetensors", "b.safetensors"], "strength_model": 1.0}

Only the LoRA fields are read; the other top-level fields (``infer_steps``, ...) are listed in
``MergeConfig.unused``, for the caller to name once. Unknown fields inside an entry are refused.

``name`` (Wan2.2 MoE: ``high_noise_model`` / ``low_noise_model``): one model's LoRAs are chosen
by name, as LightX2V's ``build_wan_model_with_lora`` (lightx2v/models/runners/wan/wan_runner.py)
keeps the entries whose ``name`` equals the model it builds; a config with names and no chosen
name is refused.

``alpha``: what the LightX2V runner that reads it does (MiniMax-H3:
lightx2v/models/networks/minimax_h3/lora.py, ``MiniMaxH3LoraAdapter._merge_file``; the same
low-rank rule as ``alpha`` in lightx2v/utils/lora_loader.py, ``LoRALoader.apply_lora``): a
module with its own ``.alpha`` key keeps scale alpha_key / rank; a module without one gets entry
alpha / rank (rank: the down factor's rows). Diffs are not scaled: MiniMax-H3 refuses a LoRA
holding any, and ``LoRALoader`` (which would multiply them by alpha) is never given one.
LightX2V's Wan, Qwen-Image and other runners (lightx2v/models/networks/lora_adapter.py,
``LoraAdapter.apply_lora``) read only ``path`` and ``strength`` and never pass ``alpha`` on;
their configs carry none.

Relative paths: LightX2V opens them from the working directory; loraforge tries the config's
directory first, then the working directory, and refuses a path that exists in both as two
different files.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from ..errors import CheckpointNotFound, UsageError
from ..io.json_files import read_json
from .numbers import checked, is_number

_ENTRY_FIELDS = ("name", "path", "strength", "alpha")
_SHAPES = "{'lora_configs': [{'path', 'strength'}]} or {'lora_path': [...], 'strength_model': 1.0}"


def _number(value: object, what: str, where: str | None = None) -> float:
    # Only a float can be NaN or infinite; an int past float64 is ``checked``'s range error.
    if not is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
        raise UsageError(f"{what} must be a finite number, got {value!r}", path=where)
    return checked(value, what, path=where)


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
    name: str | None = field(default=None, compare=False)  # the entries' chosen ``name``
    unused: tuple[str, ...] = field(default=(), compare=False)  # top-level fields not read

    def to_dict(self) -> dict:
        """The ``lora_configs`` shape, which ``from_dict`` reads back to an equal config."""
        return {"lora_configs": [spec.to_dict() for spec in self.loras]}

    @classmethod
    def from_dict(
        cls,
        data: object,
        *,
        where: str | None = None,
        base_dir: str = ".",
        name: str | None = None,
    ) -> MergeConfig:
        """Either LightX2V shape; relative paths are looked up in ``base_dir``, then in the
        working directory; ``name`` chooses the entries carrying that ``name``."""
        if not isinstance(data, dict):
            raise UsageError(f"a merge config must be a JSON object: {_SHAPES}", path=where)
        if "lora_path" not in data and "lora_configs" not in data:
            raise UsageError(f"the config names no LoRA; expected {_SHAPES}", path=where)
        entries = _entries(data, where)
        read = ("lora_configs",) if "lora_configs" in data else ("lora_path", "strength_model")
        unused = tuple(sorted(set(data) - set(read)))
        if entries is not None:
            named = _choose(entries, name, where)
            specs = [_entry(e, i, where, base_dir) for i, e in named]
        else:
            if name is not None:
                raise _no_names(name, where)
            specs = _lora_path_specs(data, where, base_dir)
        if not specs:
            raise UsageError("the config names no LoRA", path=where)
        return cls(tuple(specs), name=name, unused=unused)


def named_loras(
    data: dict, *, where: str | None = None, base_dir: str = "."
) -> list[tuple[str | None, LoraSpec]]:
    """Every LoRA a LightX2V config names, in order, each with its entry's ``name`` (None for
    an entry without one and for the ``lora_path`` shape): for a runtime that hands each of its
    models its own LoRAs (Wan2.2 MoE). [] when the config names no LoRA (an inference config
    may have none); the fields are checked as ``MergeConfig.from_dict`` checks them."""
    if "lora_path" not in data and data.get("lora_configs") is None:
        return []
    entries = _entries(data, where)
    if entries is None:
        return [(None, spec) for spec in _lora_path_specs(data, where, base_dir)]
    named = []
    for i, entry in enumerate(entries):
        name = entry.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise UsageError(
                f"lora_configs[{i}]: 'name' must be a non-empty string, got {name!r}", path=where
            )
        named.append((name, _entry(entry, i, where, base_dir)))
    return named


def _lora_path_specs(data: dict, where: str | None, base_dir: str) -> list[LoraSpec]:
    paths = data.get("lora_path")
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise UsageError("'lora_path' must be a path or a list of paths", path=where)
    strength = _number(data.get("strength_model", 1.0), "'strength_model'", where)
    return [LoraSpec(resolve_config_path(p, base_dir, where), strength) for p in paths]


def _entries(data: dict, where: str | None) -> list[dict] | None:
    """The ``lora_configs`` entries, checked to be a list of objects; None for the
    ``lora_path`` shape. A config in both shapes is refused."""
    if "lora_path" in data and "lora_configs" in data:
        raise UsageError("give either 'lora_path' or 'lora_configs', not both", path=where)
    if "lora_path" in data:
        return None
    entries = data.get("lora_configs")
    if not isinstance(entries, list):
        raise UsageError("'lora_configs' must be a list of objects", path=where)
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UsageError(
                f"lora_configs[{i}] must be an object with 'path' and 'strength'", path=where
            )
    return entries


def _choose(entries: list[dict], name: str | None, where: str | None) -> list[tuple[int, dict]]:
    """The entries (with their positions) that ``name`` chooses: all when none is named."""
    names = [e.get("name") for e in entries]
    if all(n is None for n in names):
        if name is not None:
            raise _no_names(name, where)
        return list(enumerate(entries))
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n:
            raise UsageError(
                f"lora_configs[{i}]: 'name' must be a non-empty string when entries are named, "
                f"got {n!r}",
                path=where,
            )
    listed = ", ".join(dict.fromkeys(names))
    if name is None:
        raise UsageError(
            f"the LoRAs are named ({listed}): choose one with --config-name NAME", path=where
        )
    if name not in names:
        raise UsageError(f"no lora_configs entry is named {name!r}; names: {listed}", path=where)
    return [(i, e) for i, e in enumerate(entries) if e["name"] == name]


def _no_names(name: str, where: str | None) -> UsageError:
    return UsageError(
        f"--config-name {name!r} given, but no lora_configs entry carries a 'name'", path=where
    )


def _entry(entry: dict, i: int, where: str | None, base_dir: str) -> LoraSpec:
    what = f"lora_configs[{i}]"
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
    return LoraSpec(resolve_config_path(path, base_dir, where), strength, alpha)


def resolve_config_path(path: str, base_dir: str, where: str | None) -> str:
    """The config's directory first, then the working directory (where LightX2V looks); the
    config's directory when neither holds it (the missing file is reported later)."""
    path = os.path.expanduser(path)
    beside = os.path.normpath(os.path.join(os.path.abspath(base_dir), path))
    here = os.path.normpath(os.path.abspath(path))
    if os.path.isabs(path) or beside == here or not os.path.exists(here):
        return beside
    if not os.path.exists(beside):
        return here
    if os.path.samefile(beside, here):
        return beside
    raise UsageError(
        f"'{path}' names two different files: {beside} (beside the config) and {here} (from "
        "the working directory)",
        path=where,
        hint="write the path absolute, or run from the config's directory",
    )


def load_merge_config(
    path: str, *, check_files: bool = True, name: str | None = None
) -> MergeConfig:
    """Read ``path``; with ``check_files`` every LoRA it names must exist. ``name`` chooses
    the entries carrying that ``name`` (required when entries are named)."""
    where = os.path.abspath(os.path.expanduser(path))
    data = read_json(where, "merge config not found")
    config = MergeConfig.from_dict(data, where=where, base_dir=os.path.dirname(where), name=name)
    config = dataclasses.replace(config, path=where)
    if check_files:
        for spec in config.loras:
            if not os.path.exists(spec.path):
                raise CheckpointNotFound(
                    f"names a LoRA that does not exist: {spec.path}",
                    path=where,
                    hint="fix the path; relative paths are read from the config's directory, "
                    "then from the working directory",
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
    """A finite float within float32's range from an option's text, or a one-line usage
    error."""
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise UsageError(f"{option} must be finite, got {text!r}")
    return checked(value, option, hint=f"give a smaller {option}")


def loras_from_arguments(
    config: str | None,
    config_name: str | None,
    lora_models: list[str] | None,
    strengths: list[str] | None,
) -> MergeConfig:
    """The LoRAs a command was given: ``--config`` (with ``--config-name``) or
    ``--lora-model``/``--strength``, never both."""
    if config and (lora_models or strengths):
        raise UsageError("give the LoRAs with --config or with --lora-model, not both")
    if config_name is not None and not config:
        raise UsageError("--config-name chooses entries of a --config file; none given")
    if config:
        return load_merge_config(config, name=config_name)
    return config_from_options(lora_models or [], strengths or [])
