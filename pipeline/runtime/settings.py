"""What a LightX2V inference config (``--config_json``) sets for a run: the fields that change
the result, checked and typed; every other field is named once as ignored.

Fields read (LightX2V's names and meanings, lightx2v/utils/set_config.py and the Wan runners):
``infer_steps``, ``target_video_length``, ``target_height``, ``target_width``,
``sample_guide_scale`` (a number; Wan 2.2 MoE: also ``[high, low]``), ``sample_shift``,
``enable_cfg``, ``fps``, ``text_len``; distill classes: ``denoising_step_list`` (then
``infer_steps`` is its length); Wan 2.2 MoE: ``boundary`` (UniPC) or ``boundary_step_index``
(distill); LoRAs: ``lora_configs`` or ``lora_path`` + ``strength_model``; transformers in Wan's
original layout: ``dit_original_ckpt`` (Wan 2.1), ``high_noise_original_ckpt`` /
``low_noise_original_ckpt`` (Wan 2.2 MoE). A field of another model class is ignored as
LightX2V's runner for this class ignores it."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from ..errors import UsageError
from ..io.json_files import read_json
from ..lora.config import LoraSpec, named_loras, resolve_config_path
from .models import EXPERTS, ModelClass

LORA_FIELDS = ("lora_configs", "lora_path", "strength_model")
COMMON = (
    "infer_steps",
    "target_video_length",
    "target_height",
    "target_width",
    "sample_guide_scale",
    "sample_shift",
    "enable_cfg",
    "fps",
    "text_len",
    *LORA_FIELDS,
)
ORIGINAL_CKPTS = {
    "dit_original_ckpt": "transformer",
    **{f"{expert.removesuffix('_model')}_original_ckpt": name for expert, name in EXPERTS.items()},
}


def fields_for(model: ModelClass) -> tuple[str, ...]:
    """The config fields a run of ``model`` reads."""
    own = ["denoising_step_list"] if model.distill else []
    if model.moe:
        own += ["boundary_step_index" if model.distill else "boundary"]
        own += ["high_noise_original_ckpt", "low_noise_original_ckpt"]
    else:
        own += ["dit_original_ckpt"]
    return (*COMMON, *own)


@dataclass(frozen=True)
class Settings:
    infer_steps: int = 50
    target_video_length: int = 81
    target_height: int = 480
    target_width: int = 832
    sample_guide_scale: tuple[float, ...] = (5.0,)  # one, or (high, low) for Wan 2.2 MoE
    sample_shift: float | None = None  # None: the model folder's scheduler's shift
    enable_cfg: bool = False  # LightX2V's default (get_default_config)
    denoising_step_list: tuple[float, ...] | None = None
    boundary: float | None = None  # None: the folder's boundary_ratio
    boundary_step_index: int = 2  # LightX2V's default (Wan22StepDistillScheduler)
    fps: int = 16
    text_len: int = 512
    loras: tuple[tuple[str | None, LoraSpec], ...] = ()  # (expert name or None, LoRA)
    originals: tuple[tuple[str, str], ...] = ()  # (component, original-layout checkpoint)
    path: str | None = field(default=None, compare=False)
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @property
    def steps(self) -> int:
        """Denoising steps: the distill list's length, else ``infer_steps``."""
        return len(self.denoising_step_list) if self.denoising_step_list else self.infer_steps

    def with_overrides(self, **values) -> Settings:
        """The settings with some result fields replaced (a server request's), checked as the
        config's are."""
        checked = {name: _CHECKS[name](value, name, None) for name, value in values.items()}
        return dataclasses.replace(self, **checked)

    def check_frames(self, temporal: int, where: str | None) -> None:
        """Frames the model can make: ``temporal``·k + 1 (``temporal`` = 4 for Wan)."""
        frames = self.target_video_length
        if (frames - 1) % temporal:
            lower = (frames - 1) // temporal * temporal + 1
            raise UsageError(
                f"'target_video_length' must be {temporal}k+1 frames, got {frames}",
                path=where,
                hint=f"use {lower} or {lower + temporal}",
            )

    def check_size(self, spatial: int, where: str | None) -> None:
        """Height and width multiples of ``spatial`` (the VAE's factor times the patch size,
        16 for Wan)."""
        for name in ("target_height", "target_width"):
            value = getattr(self, name)
            if value % spatial:
                raise UsageError(
                    f"'{name}' must be a multiple of {spatial}, got {value}", path=where
                )


def read_settings(path: str | None, model: ModelClass) -> Settings:
    """The settings of ``path`` (None: the defaults) for a run of ``model``."""
    if path is None:
        return Settings()
    where = os.path.abspath(os.path.expanduser(path))
    data = read_json(where, "config not found")
    if not isinstance(data, dict):
        raise UsageError("an inference config must be a JSON object", path=where)
    read = fields_for(model)
    values = {
        name: _CHECKS[name](data[name], name, where)
        for name in read
        if name in data and name in _CHECKS
    }
    if "sample_guide_scale" in values and len(values["sample_guide_scale"]) > 1 and not model.moe:
        raise UsageError(
            f"'sample_guide_scale' is a list (one per Wan 2.2 expert); --model_cls {model.name} "
            "takes one number",
            path=where,
        )
    if model.distill and "denoising_step_list" not in values:
        raise UsageError(
            f"--model_cls {model.name} runs the step-distill schedule: the config needs "
            "'denoising_step_list' (e.g. [1000, 750, 500, 250])",
            path=where,
        )
    base_dir = os.path.dirname(where)
    loras = tuple(named_loras(data, where=where, base_dir=base_dir))
    originals = tuple(
        (ORIGINAL_CKPTS[name], resolve_config_path(_path(data[name], name, where), base_dir, where))
        for name in read
        if name in ORIGINAL_CKPTS and data.get(name)
    )
    ignored = tuple(sorted(set(data) - set(read)))
    return Settings(**values, loras=loras, originals=originals, path=where, ignored=ignored)


def _int(value: object, name: str, where: str | None, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"'{name}' must be an integer >= {minimum}, got {value!r}", path=where)
    return value


def _number(value: object, name: str, where: str | None) -> float:
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits, valid JSON
            pass
    if not math.isfinite(number):
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."
        raise UsageError(f"'{name}' must be a finite number, got {shown}", path=where)
    return number


def _positive(value: object, name: str, where: str | None) -> float:
    number = _number(value, name, where)
    if number <= 0:
        raise UsageError(f"'{name}' must be > 0, got {value!r}", path=where)
    return number


def _bool(value: object, name: str, where: str | None) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"'{name}' must be true or false, got {value!r}", path=where)
    return value


def _guide(value: object, name: str, where: str | None) -> tuple[float, ...]:
    if isinstance(value, list):
        if len(value) != 2:
            raise UsageError(f"'{name}' must be a number or [high, low], got {value!r}", path=where)
        return tuple(_number(v, name, where) for v in value)
    return (_number(value, name, where),)


def _steps(value: object, name: str, where: str | None) -> tuple[float, ...]:
    """LightX2V's distill timesteps: decreasing, in (0, 1000]."""
    if not isinstance(value, list) or not value:
        raise UsageError(f"'{name}' must be a list of timesteps, got {value!r}", path=where)
    steps = [_number(v, name, where) for v in value]
    pairs = zip(steps, steps[1:], strict=False)
    if any(not 0 < s <= 1000 for s in steps) or any(a <= b for a, b in pairs):
        raise UsageError(f"'{name}' must decrease within (0, 1000], got {value!r}", path=where)
    return tuple(steps)


def _ratio(value: object, name: str, where: str | None) -> float:
    number = _number(value, name, where)
    if not 0 < number < 1:
        raise UsageError(f"'{name}' must be between 0 and 1, got {value!r}", path=where)
    return number


def _path(value: object, name: str, where: str | None) -> str:
    if not isinstance(value, str):
        raise UsageError(f"'{name}' must be a path, got {value!r}", path=where)
    return value


_CHECKS = {
    "infer_steps": _int,
    "target_video_length": _int,
    "target_height": _int,
    "target_width": _int,
    "sample_guide_scale": _guide,
    "sample_shift": _positive,
    "enable_cfg": _bool,
    "denoising_step_list": _steps,
    "boundary": _ratio,
    "boundary_step_index": _int,
    "fps": _int,
    "text_len": _int,
}
