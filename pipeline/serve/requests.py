"""A request checked and turned into the job the worker runs, before it is queued: every field
that could make the run fail is refused here, as a 4xx naming the field, so a queued task fails
only for what cannot be known in advance (a LoRA tensor holding NaN, a full disk).

- ``lora_name`` / ``lora_configs[i].path``: a file or PEFT directory inside ``--lora_dir``,
  ``..`` resolved, refused if it reaches outside (symlinks the operator put in ``--lora_dir``
  are followed: a request cannot make one); the LoRA must fit
  the model: every key patches a weight (a LoRA for another model is refused, naming it).
- ``lora_strength`` / ``strength``: finite.
- ``image_path`` (i2v): a readable image on the server.
- ``infer_steps``, ``target_video_length``, ``target_shape`` [H, W]: as the config's fields;
  a distill model's step count is its ``denoising_step_list``'s.
- ``save_result_path``: relative, inside ``--output_dir`` (``.mp4`` added when missing)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

from ..errors import LoraforgeError
from ..lora.config import LoraSpec
from ..runtime.generate import Job, Runtime
from ..runtime.loras import Assigned, assign
from ..runtime.spec import check_image
from .schema import VideoTaskRequest

READ = {
    "task_id",
    "prompt",
    "negative_prompt",
    "image_path",
    "save_result_path",
    "infer_steps",
    "target_video_length",
    "target_shape",
    "seed",
    "lora_name",
    "lora_strength",
    "lora_configs",
}


class BadRequest(Exception):
    """A request refused: HTTP ``status`` with ``{"detail": message, "field": field}``."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(message)
        self.field, self.message, self.status = field, message, status


@dataclass(frozen=True)
class Context:
    """What a request is checked against: the loaded model, the config's LoRAs (applied under
    every request's), ``--lora_dir`` and ``--output_dir``."""

    runtime: Runtime
    base_loras: Assigned
    lora_dir: str | None
    output_dir: str


@dataclass
class Plan:
    job: Job
    loras: Assigned  # the config's, then the request's, per transformer
    requested: list[dict]  # the request's LoRAs, as the task status shows them
    output: str  # absolute
    save_result_path: str  # as reported: relative to --output_dir
    ignored: list[str] = field(default_factory=list)


def plan_request(request: VideoTaskRequest, context: Context) -> Plan:
    spec = context.runtime.spec
    settings = _settings(request, spec)
    image = None
    if spec.task == "i2v":
        try:
            image = check_image(request.image_path, spec.task, "image_path")
        except LoraforgeError as e:
            raise BadRequest("image_path", str(e)) from None
    relative, output = _output(request, context.output_dir)
    requested, named = _loras(request, context)
    try:
        extra = assign(spec.model, named, None, "lora_configs")
    except LoraforgeError as e:
        raise BadRequest("lora_configs", str(e)) from None
    try:
        context.runtime.loras.check(extra, strict=True)
    except LoraforgeError as e:
        raise BadRequest("lora_configs" if request.lora_configs else "lora_name", str(e)) from None
    loras = {name: context.base_loras.get(name, ()) + extra[name] for name in extra}
    seed = request.seed if request.seed is not None else random.randint(0, 2**32 - 1)
    job = Job(request.prompt, request.negative_prompt, seed, settings, image)
    ignored = sorted(set(request.model_fields_set | set(request.model_extra or {})) - READ)
    if request.image_path and spec.task == "t2v":
        ignored.append("image_path")
    return Plan(job, loras, requested, output, relative, ignored)


def _settings(request: VideoTaskRequest, spec):
    """The config's settings with the request's overrides; a refusal names the field."""
    settings, sent = spec.settings, request.model_fields_set
    if "infer_steps" in sent and request.infer_steps is not None:
        if not spec.model.distill:
            settings = _override(settings, "infer_steps", infer_steps=request.infer_steps)
        elif request.infer_steps != settings.steps:
            raise BadRequest(
                "infer_steps",
                f"--model_cls {spec.model.name} runs the {settings.steps} steps of the config's "
                f"denoising_step_list; got {request.infer_steps}",
            )
    if "target_video_length" in sent and request.target_video_length is not None:
        settings = _override(
            settings, "target_video_length", target_video_length=request.target_video_length
        )
    if request.target_shape:
        if len(request.target_shape) != 2:
            raise BadRequest("target_shape", f"must be [height, width], got {request.target_shape}")
        height, width = request.target_shape
        settings = _override(settings, "target_shape", target_height=height, target_width=width)
    checks = (
        ("target_video_length", settings.check_frames, spec.folder.temporal),
        ("target_shape", settings.check_size, spec.folder.spatial),
    )
    for field_name, check, multiple in checks:
        try:
            check(multiple, None)
        except LoraforgeError as e:  # the config's shape was checked at start: the request's
            raise BadRequest(field_name, str(e)) from None
    return settings


def _override(settings, field_name: str, **values):
    try:
        return settings.with_overrides(**values)
    except LoraforgeError as e:
        raise BadRequest(field_name, str(e)) from None


def _loras(request: VideoTaskRequest, context: Context):
    """The request's LoRAs: (what the status shows, (name, LoraSpec) entries)."""
    if request.lora_name is not None and request.lora_configs is not None:
        raise BadRequest("lora_configs", "give lora_name or lora_configs, not both")
    if request.lora_name is not None:
        path = _inside(request.lora_name, context.lora_dir, "lora_name")
        entries = [(None, LoraSpec(path, request.lora_strength))]
        shown = [{"path": request.lora_name, "strength": request.lora_strength}]
        return shown, entries
    entries, shown = [], []
    for i, entry in enumerate(request.lora_configs or []):
        path = _inside(entry.path, context.lora_dir, f"lora_configs[{i}].path")
        entries.append((entry.name, LoraSpec(path, entry.strength)))
        shown.append(entry.model_dump(exclude_none=True))
    return shown, entries


def _inside(name: str, lora_dir: str | None, field_name: str) -> str:
    """``name`` inside ``lora_dir`` once ``.`` and ``..`` are resolved; refused if missing or
    reaching outside it. Symlinks the operator put in ``lora_dir`` are followed."""
    if lora_dir is None:
        raise BadRequest(field_name, "this server has no --lora_dir: it takes no LoRA by name")
    if not name or os.path.isabs(name):
        raise BadRequest(field_name, f"{name!r} is not a name inside --lora_dir")
    root = os.path.abspath(lora_dir)
    path = os.path.normpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root or path == root:
        raise BadRequest(field_name, f"{name!r} reaches outside --lora_dir", status=403)
    if not os.path.exists(path):
        raise BadRequest(field_name, f"no LoRA {name!r} in --lora_dir", status=404)
    return path


def _output(request: VideoTaskRequest, output_dir: str) -> tuple[str, str]:
    relative = request.save_result_path or request.task_id
    if not os.path.splitext(relative)[1]:
        relative += ".mp4"
    root = os.path.realpath(output_dir)
    path = os.path.realpath(os.path.join(root, relative))
    if os.path.isabs(relative) or os.path.commonpath([root, path]) != root or path == root:
        raise BadRequest(
            "save_result_path", f"{relative!r} is not a file name inside --output_dir", 403
        )
    if os.path.isdir(path):
        raise BadRequest("save_result_path", f"{relative!r} is a directory")
    return os.path.relpath(path, root), path
