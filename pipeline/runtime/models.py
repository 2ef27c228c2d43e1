"""The model classes and tasks ``--model_cls`` / ``--task`` choose, as LightX2V names them
(lightx2v/infer.py): one table feeds the CLI help, the checks and the runtime.

A Wan 2.2 MoE model has two transformers: diffusers' ``transformer`` runs the high-noise steps
(LightX2V's ``high_noise_model``), ``transformer_2`` the low-noise ones (``low_noise_model``).
A distill class runs LightX2V's step-distill schedule (``denoising_step_list``) without CFG
unless the config enables it."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class ModelClass:
    name: str
    transformers: tuple[str, ...]  # diffusers component names, high-noise first
    distill: bool
    help: str

    @property
    def moe(self) -> bool:
        return len(self.transformers) == 2


ONE, TWO = ("transformer",), ("transformer", "transformer_2")
MODEL_CLASSES = {
    c.name: c
    for c in (
        ModelClass("wan2.1", ONE, False, "Wan 2.1, UniPC over infer_steps"),
        ModelClass("wan2.1_distill", ONE, True, "Wan 2.1, the denoising_step_list schedule"),
        ModelClass("wan2.2_moe", TWO, False, "Wan 2.2 A14B (two transformers), UniPC"),
        ModelClass(
            "wan2.2_moe_distill", TWO, True, "Wan 2.2 A14B, the denoising_step_list schedule"
        ),
    )
}
MODEL_CLASS_HELP = "; ".join(f"{c.name}: {c.help}" for c in MODEL_CLASSES.values())

# --task -> the diffusers pipeline class a model folder's model_index.json must name
TASKS = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline"}

# LightX2V's expert names (lora_configs entries' "name", *_original_ckpt fields) -> component
EXPERTS = {"high_noise_model": "transformer", "low_noise_model": "transformer_2"}


def model_class(name: str) -> ModelClass:
    found = MODEL_CLASSES.get(name)
    if found is None:
        raise UsageError(f"unknown --model_cls {name!r}; valid: {', '.join(MODEL_CLASSES)}")
    return found


def task_pipeline(task: str) -> str:
    found = TASKS.get(task)
    if found is None:
        raise UsageError(f"unknown --task {task!r}; valid: {', '.join(TASKS)}")
    return found
