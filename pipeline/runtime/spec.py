"""What a run loads and generates, read and checked before anything is loaded: the model class
and task, the model folder, the config's settings, the transformers replaced by original-layout
checkpoints, the LoRAs per transformer, the input image; and every file among them (inputs no
output may overwrite)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..errors import CheckpointFormatError, CheckpointNotFound, UsageError
from ..io.reader import CheckpointIndex, index_checkpoint
from ..lora.config import LoraSpec
from ..run.paths import UserPath, checkpoint_paths
from .folder import ModelFolder, open_folder
from .loras import Assigned, Named, assign, check_files
from .models import ModelClass, model_class, task_pipeline
from .original import check_fits, diffusers_index
from .settings import Settings, read_settings

DTYPE_NAMES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class RuntimeOptions:
    """The model a run loads, as the command line gives it (``infer`` and ``serve`` alike)."""

    model_cls: str
    task: str = "t2v"
    model_path: str = ""
    config_json: str | None = None
    transformer_path: str | None = None  # original-layout checkpoint for ``transformer``
    transformer_2_path: str | None = None  # ... for ``transformer_2`` (Wan 2.2 MoE)
    dtype: str = "bf16"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RuntimeSpec:
    model: ModelClass
    task: str
    folder: ModelFolder
    settings: Settings
    originals: dict[str, str]  # transformer -> original-layout checkpoint replacing it
    dtype: str  # bf16 | fp16 | fp32
    device: str  # resolved: cpu, cuda, cuda:N
    checkpoints: dict[str, CheckpointIndex | None]  # per transformer (``transformer_checkpoints``)
    notes: tuple[str, ...]  # what ``infer`` and ``serve`` say once, before loading anything

    def inputs(self) -> list[UserPath]:
        paths = self.folder.files()
        if self.settings.path:
            paths.append(UserPath("--config_json", self.settings.path))
        for name in self.originals:
            paths += checkpoint_paths(f"--{name}_path", self.checkpoints[name])
        return paths


def open_spec(options: RuntimeOptions, device: str) -> RuntimeSpec:
    """Read and check everything ``options`` name, loading nothing. A transformer checkpoint
    on the command line replaces the config's ``*_original_ckpt`` field."""
    model = model_class(options.model_cls)
    task_pipeline(options.task)
    if options.dtype not in DTYPE_NAMES:
        raise UsageError(f"unknown --dtype {options.dtype!r}; valid: {', '.join(DTYPE_NAMES)}")
    folder = open_folder(options.model_path, model, options.task)
    settings = read_settings(options.config_json, model)
    settings.check_frames(folder.temporal, settings.path)
    settings.check_size(folder.spatial, settings.path)
    chosen = dict(settings.originals)
    given = {"transformer": options.transformer_path, "transformer_2": options.transformer_2_path}
    for name, path in given.items():
        if path is not None:
            if name not in model.transformers:
                raise UsageError(
                    f"--{name}_path: --model_cls {model.name} has no {name}",
                    hint="--transformer_2_path is for Wan 2.2 MoE models",
                )
            chosen[name] = os.path.abspath(os.path.expanduser(path))
    for name, path in chosen.items():
        if not os.path.exists(path):
            raise CheckpointNotFound(f"{name} checkpoint not found", path=path)
    checkpoints, unread = transformer_checkpoints(model, folder, chosen)
    notes = (*_ignored(settings, model), *unread)
    return RuntimeSpec(
        model, options.task, folder, settings, chosen, options.dtype, device, checkpoints, notes
    )


def _ignored(settings: Settings, model: ModelClass) -> list[str]:
    if not settings.ignored:
        return []
    return [f"config fields not used by --model_cls {model.name}: {', '.join(settings.ignored)}"]


def transformer_checkpoints(
    model: ModelClass, folder: ModelFolder, originals: dict[str, str]
) -> tuple[dict[str, CheckpointIndex | None], tuple[str, ...]]:
    """Each transformer's checkpoint headers under the module's names, read once for the whole
    run: an original-layout replacement's renamed (checked to fit the folder's where it has
    weights to compare with), or the folder's. None, with a note, for a folder transformer not
    in safetensors: its weights cannot be re-read, so LoRAs keep copies of those they patch."""
    found: dict[str, CheckpointIndex | None] = {}
    notes = []
    for name in model.transformers:
        try:
            own = index_checkpoint(folder.component(name))
        except (CheckpointNotFound, CheckpointFormatError) as e:
            own = None
            if name not in originals:
                notes.append(
                    f"{name}: weights not re-readable ({e}); LoRAs keep copies of the weights "
                    "they patch"
                )
        found[name] = own
        if name in originals:
            found[name] = diffusers_index(originals[name])
            if own is not None:
                shapes = {key: info.shape for key, info in own.tensors.items()}
                check_fits(found[name], shapes, f"{name} of {folder.path}")
    return found, tuple(notes)


def lora_specs(
    spec: RuntimeSpec, paths: list[str], strengths: list[float]
) -> tuple[Assigned, str | None]:
    """The LoRAs of a run, per transformer: ``--lora_path`` (with ``--lora_strength``: none for
    1.0, one for all, or one per path) replaces the config's; returns a note saying so when
    the config had some."""
    settings, note = spec.settings, None
    if paths:
        if strengths and len(strengths) not in (1, len(paths)):
            raise UsageError(
                f"{len(strengths)} --lora_strength values for {len(paths)} --lora_path",
                hint="give one strength for all, or one per --lora_path in the same order",
            )
        strengths = strengths or [1.0]
        strengths = strengths * len(paths) if len(strengths) == 1 else strengths
        named: Named = [
            (None, LoraSpec(os.path.abspath(os.path.expanduser(p)), s))
            for p, s in zip(paths, strengths, strict=True)
        ]
        if settings.loras:
            note = f"--lora_path replaces the {len(settings.loras)} LoRA(s) of {settings.path}"
        assigned = assign(spec.model, named, None, "--lora_path")
        check_files(assigned, None, "--lora_path")
    else:
        if strengths:
            raise UsageError("--lora_strength without --lora_path")
        assigned = assign(spec.model, settings.loras, settings.path, "lora_configs")
        check_files(assigned, settings.path, "lora_configs")
    return assigned, note


def lora_inputs(assigned: Assigned) -> list[UserPath]:
    paths = []
    for specs in assigned.values():
        for spec in specs:
            if os.path.isdir(spec.path):
                paths.append(UserPath("LoRA", spec.path))
                paths += [
                    UserPath("LoRA", os.path.join(spec.path, n)) for n in os.listdir(spec.path)
                ]
            else:
                paths.append(UserPath("LoRA", spec.path))
    return paths


def check_image(path: str | None, task: str, field: str = "--image_path") -> str | None:
    """The input image of an i2v run, checked readable; None for t2v."""
    if task != "i2v":
        return None
    if not path:
        raise UsageError(f"--task i2v needs an input image: give {field}")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise CheckpointNotFound("image not found", path=path, hint=f"check {field}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise UsageError(f"not a readable image ({e})", path=path) from None
    return path
