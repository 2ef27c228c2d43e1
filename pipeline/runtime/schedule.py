"""LightX2V's sampling settings on a diffusers Wan pipeline: the scheduler, CFG and, for Wan
2.2 MoE, where the high-noise transformer hands over to the low-noise one.

- Distill classes: LightX2V's ``WanStepDistillScheduler`` (lightx2v/models/schedulers/wan/
  step_distill/scheduler.py) takes σᵢ = shift(xᵢ/1000) for x in ``denoising_step_list``,
  shift(σ) = s·σ / (1 + (s−1)·σ) with s = ``sample_shift``, timesteps 1000·σᵢ, and plain flow
  Euler steps to σ = 0: diffusers' FlowMatchEulerDiscreteScheduler with those sigmas is the same
  schedule and update (``StepDistillScheduler``). MoE: the high-noise transformer runs steps
  < ``boundary_step_index``.
- Other classes: diffusers' UniPC over flow sigmas with ``sample_shift`` as ``flow_shift``
  (LightX2V's own UniPC picks slightly different timesteps: results are close, not
  bit-identical). MoE: the high-noise transformer while t ≥ ``boundary``·1000.
- CFG: ``enable_cfg`` false → guidance 1.0 (one transformer call per step, as LightX2V);
  true → ``sample_guide_scale`` (MoE ``[high, low]``)."""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from ..errors import UsageError
from .models import ModelClass
from .settings import Settings


class StepDistillScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow Euler over fixed sigmas: the pipeline asks for its steps (``set_timesteps(n)``)
    and gets LightX2V's distill schedule."""

    distill_sigmas: list[float] = []

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        kwargs.setdefault("sigmas", list(self.distill_sigmas))
        super().set_timesteps(len(self.distill_sigmas), device=device, **kwargs)


@dataclass(frozen=True)
class Sampling:
    steps: int
    guidance_scale: float
    guidance_scale_2: float | None  # MoE only


def configure(pipe, model: ModelClass, settings: Settings, folder_boundary: float | None) -> None:
    """Give ``pipe`` the scheduler and (MoE) boundary the settings ask for."""
    shift = settings.sample_shift
    if model.distill:
        if shift is None:
            shift = pipe.scheduler.config.get("flow_shift", 5.0)
        scheduler = StepDistillScheduler(num_train_timesteps=1000, shift=shift)
        scheduler.distill_sigmas = [x / 1000 for x in settings.denoising_step_list]
        pipe.scheduler = scheduler
    elif shift is not None:
        pipe.scheduler = UniPCMultistepScheduler.from_config(
            pipe.scheduler.config,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
        )
    if model.moe:
        pipe.register_to_config(boundary_ratio=boundary(pipe, model, settings, folder_boundary))


def boundary(pipe, model: ModelClass, settings: Settings, folder_boundary: float | None) -> float:
    """The timestep ratio where ``transformer_2`` takes over."""
    if not model.distill:
        ratio = settings.boundary if settings.boundary is not None else folder_boundary
        if ratio is None:
            raise UsageError(
                "a Wan 2.2 MoE run needs 'boundary' (e.g. 0.875 for T2V, 0.9 for I2V): the "
                "config and the folder's model_index.json give none",
                path=settings.path,
            )
        return ratio
    k, n = settings.boundary_step_index, settings.steps
    if not 0 < k < n:
        raise UsageError(
            f"'boundary_step_index' must be between 1 and {n - 1} ({n} steps), got {k}",
            path=settings.path,
        )
    pipe.scheduler.set_timesteps(n)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    return (timesteps[k - 1] + timesteps[k]) / 2 / 1000  # between step k-1 and step k


def sampling(model: ModelClass, settings: Settings) -> Sampling:
    """What the pipeline is called with."""
    scales = settings.sample_guide_scale if settings.enable_cfg else (1.0,)
    second = scales[-1] if model.moe else None
    return Sampling(settings.steps, scales[0], second)
