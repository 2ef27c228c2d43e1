"""The option set of the model a Wan run loads, shared by ``infer`` and ``serve``: LightX2V's
flag names (``--model_cls``, ``--model_path``, ...) and loraforge's (``--transformer_path``,
``--dtype``), built into ``RuntimeOptions``."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from ..runtime.models import MODEL_CLASS_HELP, MODEL_CLASSES, TASKS
from ..runtime.spec import DTYPE_NAMES, RuntimeOptions
from .parameters import OptionSet

ModelClsName = Enum("ModelClsName", {name: name for name in MODEL_CLASSES}, type=str)
TaskName = Enum("TaskName", {name: name for name in TASKS}, type=str)
DtypeName = Enum("DtypeName", {name: name for name in DTYPE_NAMES}, type=str)


def _runtime_options(**fields) -> RuntimeOptions:
    fields["model_cls"] = ModelClsName(fields["model_cls"]).value
    fields["task"] = TaskName(fields["task"]).value
    fields["dtype"] = DtypeName(fields["dtype"]).value
    return RuntimeOptions(**fields)


RUNTIME = OptionSet(
    "runtime",
    _runtime_options,
    {
        "model_cls": (
            Annotated[ModelClsName, typer.Option("--model_cls", help=MODEL_CLASS_HELP)],
            ...,
        ),
        "task": (
            Annotated[
                TaskName,
                typer.Option("--task", help="t2v: text to video; i2v: image to video."),
            ],
            "t2v",
        ),
        "model_path": (
            Annotated[
                str,
                typer.Option(
                    "--model_path",
                    help="A diffusers model folder (model_index.json, transformer/, vae/, ...): "
                    "WanPipeline for t2v, WanImageToVideoPipeline for i2v.",
                ),
            ],
            ...,
        ),
        "config_json": (
            Annotated[
                str | None,
                typer.Option(
                    "--config_json",
                    metavar="FILE.json",
                    help="A LightX2V inference config: infer_steps, target_video_length, "
                    "target_height/width, sample_guide_scale, sample_shift, enable_cfg, "
                    "denoising_step_list, lora_configs, ... (other fields are named as ignored).",
                ),
            ],
            None,
        ),
        "transformer_path": (
            Annotated[
                str | None,
                typer.Option(
                    "--transformer_path",
                    metavar="PATH",
                    help="A transformer in Wan's original layout (a .safetensors file or shard "
                    "directory) replacing the folder's (Wan 2.2 MoE: the high-noise one).",
                ),
            ],
            None,
        ),
        "transformer_2_path": (
            Annotated[
                str | None,
                typer.Option(
                    "--transformer_2_path",
                    metavar="PATH",
                    help="Wan 2.2 MoE: the low-noise transformer, as --transformer_path.",
                ),
            ],
            None,
        ),
        "dtype": (
            Annotated[
                DtypeName,
                typer.Option("--dtype", help="Transformers and text encoder (the VAE runs fp32)."),
            ],
            "bf16",
        ),
    },
)
