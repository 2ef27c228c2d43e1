"""The LoRA config PEFT and diffusers scale by, both ways: read (``PeftConfig``: ``r``,
``lora_alpha``, rsLoRA, ``rank_pattern`` / ``alpha_pattern``, checked as PEFT reads them) from an
``adapter_config.json`` or a diffusers file's header, and built from a written LoRA's ranks and
alphas (PEFT's ``adapter_config.json``; diffusers' ``lora_adapter_metadata`` header entry, the
same fields prefixed with ``transformer.``).

Every module gets scale = alpha / rank exactly: the most common rank and alpha are ``r`` and
``lora_alpha``; other modules are listed in ``rank_pattern`` / ``alpha_pattern`` under their
full name, escaped and anchored: PEFT matches a pattern as ``(.*\\.)?(<pattern>)$``
(``peft/utils/other.py::get_pattern_key``), so a bare ``proj_out`` would also set
``blocks.0.proj_out``; ``^proj_out`` is that module alone (as diffusers writes them)."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointFormatError
from ..io import safetensors_format as stf
from ..io.json_files import read_json
from ..io.reader import CheckpointIndex
from .numbers import checked

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
        "rank_pattern": {_anchored(m): k for m, k, _ in sorted(modules) if k != r},
        "alpha_pattern": {_anchored(m): _number(a) for m, _, a in sorted(modules) if a != alpha},
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def _anchored(module: str) -> str:
    """The pattern that matches ``module`` and nothing else under PEFT's rule."""
    return "^" + re.escape(module)


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


@dataclass(frozen=True)
class PeftConfig:
    """The scaling part of a PEFT ``adapter_config.json``. ``source``: the file (or header) it
    was read from; None for one loraforge made up (a LightX2V config entry's alpha), whose
    ``r`` is no claim about the tensors."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = field(default=None, compare=False)
    source: str | None = field(default=None, compare=False)

    def rank_for(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def alpha_for(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scale_for(self, module: str, rank: int) -> float:
        """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); ``rank`` is the tensors' own rank."""
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def check_rank(self, module: str, rank: int) -> None:
        """Refuse a module whose factors' ``rank`` is not the rank this config gives it: PEFT
        builds the module at the config's rank and would not load those factors (nor load a
        module outside ``target_modules`` at all), so no reading of the file scales it."""
        said = self.rank_for(module)
        if self.source is None or said == rank:
            return
        field_name = "'rank_pattern'" if said != self.r else "'r'"
        outside = ""
        if self.target_modules is not None and not _targeted(self.target_modules, module):
            outside = ", and it is not in target_modules, so PEFT would not load it at all"
        raise CheckpointFormatError(
            f"module '{module}' holds rank-{rank} factors but {field_name} gives it rank "
            f"{said}{outside}",
            path=self.source,
            hint="set 'r' or 'rank_pattern' to the factors' rank, or drop the module's keys",
        )


def _targeted(targets: list[str] | str, module: str) -> bool:
    """PEFT's ``check_target_module_exists``: a string is a regex matched against the whole
    name, a list names modules by their last dotted parts; "all-linear" takes any."""
    if isinstance(targets, str):
        return targets == "all-linear" or re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    # PEFT's get_pattern_key (peft/utils/other.py): the first pattern, in the config's order,
    # matching `(.*\.)?({pattern})$` wins; `^name` matches the full name only
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


def load_peft_config(path: str | os.PathLike[str]) -> PeftConfig:
    """Read ``adapter_config.json`` (or the directory holding it)."""
    file = Path(path)
    if file.is_dir():
        file = file / "adapter_config.json"
    where = str(file)
    raw = read_json(where, "PEFT adapter config not found", unreadable=CheckpointFormatError)
    return peft_config_from(raw, where)


def peft_config_from(raw: object, where: str) -> PeftConfig:
    """The scaling part of a PEFT LoRA config already parsed from JSON (an adapter_config.json,
    or the ``lora_adapter_metadata`` a diffusers file carries in its header); ``where`` names
    it in errors."""

    def bad(what: str) -> CheckpointFormatError:
        return CheckpointFormatError(what, path=where, hint="is this a PEFT LoRA adapter_config?")

    if not isinstance(raw, dict):
        raise bad("expected a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise bad(f"peft_type is {raw['peft_type']!r}, not 'LORA'")
    if raw.get("use_dora"):
        raise bad("DoRA adapters are not supported (their magnitude vectors would be ignored)")
    r, alpha = raw.get("r"), raw.get("lora_alpha", 8)  # 8: PEFT's default lora_alpha
    if not _is_int(r) or r <= 0:
        raise bad(f"'r' must be a positive integer, got {r!r}")
    if not _is_num(alpha):
        raise bad(f"'lora_alpha' must be a number, got {alpha!r}")
    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    for name, pat, ok in (("rank", rank_pattern, _is_rank), ("alpha", alpha_pattern, _is_num)):
        if not isinstance(pat, dict) or not all(ok(v) for v in pat.values()):
            what = "positive integers" if name == "rank" else "numbers"
            raise bad(f"'{name}_pattern' must map module patterns to {what}")
        for key in pat:
            try:
                re.compile(key)
            except re.error as e:
                raise bad(f"'{name}_pattern' key {key!r} is not a valid regex: {e}") from e
    targets = raw.get("target_modules")
    if not (isinstance(targets, str) or _is_names(targets)):
        targets = None  # absent, or a shape PEFT would refuse: no claim made about modules

    def alpha_value(value: object, what: str) -> float:
        hint = "set it to the alpha the LoRA was trained with: PEFT scales by lora_alpha / r"
        return checked(value, what, path=where, error=CheckpointFormatError, hint=hint)

    return PeftConfig(
        r=r,
        lora_alpha=alpha_value(alpha, "'lora_alpha'"),
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern={k: int(v) for k, v in rank_pattern.items()},
        alpha_pattern={
            k: alpha_value(v, f"'alpha_pattern' {k!r}") for k, v in alpha_pattern.items()
        },
        target_modules=targets,
        source=where,
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_rank(v: object) -> bool:
    return _is_int(v) and v > 0


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_names(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(t, str) for t in v)
