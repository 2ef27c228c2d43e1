"""A diffusers model folder, checked from its JSON files before anything is loaded: the pipeline
class the task needs, the transformers the model class needs, the frame and size multiples,
and every file in it (inputs no output may overwrite)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import CheckpointNotFound, ModelMismatch, UsageError
from ..io.json_files import read_json
from ..run.paths import UserPath
from .models import TASKS, ModelClass


@dataclass(frozen=True)
class ModelFolder:
    path: str
    pipeline_class: str  # WanPipeline | WanImageToVideoPipeline
    transformers: tuple[str, ...]  # the components the model class runs
    spatial: int  # height and width multiples: the VAE's factor times the patch size
    temporal: int  # frames are temporal·k + 1
    boundary_ratio: float | None  # model_index.json's (Wan 2.2)

    def component(self, name: str) -> str:
        return os.path.join(self.path, name)

    def files(self) -> list[UserPath]:
        """Every file of the folder, as inputs of the run."""
        return [
            UserPath("--model_path", os.path.join(directory, name))
            for directory, _dirs, names in os.walk(self.path)
            for name in sorted(names)
        ]


def open_folder(path: str, model: ModelClass, task: str) -> ModelFolder:
    """Check ``path`` holds the pipeline ``task`` runs with the transformers ``model`` needs."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise CheckpointNotFound(
            "no such model folder", path=path, hint="--model_path takes a diffusers model folder"
        )
    index = _json(os.path.join(path, "model_index.json"), "--model_path")
    found, wanted = index.get("_class_name"), TASKS[task]
    if found != wanted:
        raise ModelMismatch(
            f"model_index.json names {found}; --task {task} needs a {wanted} folder",
            path=path,
            hint="pick the --task the model was made for, or another --model_path",
        )
    has = [name for name in ("transformer", "transformer_2") if _present(index.get(name))]
    if tuple(has) != model.transformers:
        kind = "two transformers (Wan 2.2 MoE)" if len(has) == 2 else "one transformer"
        raise ModelMismatch(
            f"the folder holds {kind}; --model_cls {model.name} runs {len(model.transformers)}",
            path=path,
            hint="use --model_cls wan2.2_moe(_distill) for two, wan2.1(_distill) for one",
        )
    configs = {name: _json(os.path.join(path, name, "config.json"), name) for name in has}
    vae = _json(os.path.join(path, "vae", "config.json"), "vae")
    patch = configs["transformer"].get("patch_size", [1, 2, 2])
    return ModelFolder(
        path=path,
        pipeline_class=wanted,
        transformers=tuple(has),
        spatial=int(vae.get("scale_factor_spatial", 8)) * int(patch[1]),
        temporal=int(vae.get("scale_factor_temporal", 4)),
        boundary_ratio=index.get("boundary_ratio"),
    )


def _present(entry: object) -> bool:
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def _json(path: str, what: str) -> dict:
    data = read_json(
        path,
        "missing: not a diffusers model folder",
        hint="--model_path takes a folder as diffusers' save_pretrained writes it",
    )
    if not isinstance(data, dict):
        raise UsageError(f"{what}: not a JSON object", path=path)
    return data
