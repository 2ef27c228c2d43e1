"""A loaded model that generates videos: the pipeline on its device, its scheduler set from the
config, its LoRAs switched per job, the denoising steps reported as they finish.

Determinism: the noise comes from a CPU generator seeded with the job's seed (the same on any
device), and torch's CPU thread count is fixed per process (the cores this process may use), so
a job gives the same bytes in ``loraforge infer`` and in ``loraforge serve``'s worker."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..run.clock import PhaseClock
from .load import DTYPES, load_pipeline
from .loras import Assigned, ModelLoras, weights_digest
from .schedule import configure, sampling
from .settings import Settings
from .spec import RuntimeSpec
from .video import frames_digest

# (step index, timestep, seconds since the call began); may raise to stop the run
StepCallback = Callable[[int, float, float], None]


@dataclass(frozen=True)
class Job:
    prompt: str
    negative_prompt: str
    seed: int
    settings: Settings  # the config's, or a request's overrides of it
    image_path: str | None = None  # i2v


@dataclass
class Generated:
    frames: np.ndarray  # (frames, height, width, 3) float32 in [0, 1]
    digest: str  # sha256 of the frames' bytes


def threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's CPU threads at ``count`` for the block, as they were afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class Runtime:
    def __init__(self, spec: RuntimeSpec, pipe, loras: ModelLoras, threads: int):
        self.spec, self.pipe, self.loras, self.threads = spec, pipe, loras, threads

    @classmethod
    def load(cls, spec: RuntimeSpec) -> Runtime:
        """Load the pipeline and set its scheduler; no LoRA is applied yet."""
        replacements = {name: spec.checkpoints[name] for name in spec.originals}
        count = threads()
        with torch_threads(count):
            pipe = load_pipeline(spec.folder, replacements, DTYPES[spec.dtype], spec.device)
        configure(pipe, spec.model, spec.settings, spec.folder.boundary_ratio)
        return cls(spec, pipe, ModelLoras(pipe, spec.model, spec.checkpoints), count)

    def switch(self, assigned: Assigned) -> bool:
        """Apply ``assigned`` in place of the current LoRAs (``ModelLoras.switch``)."""
        return self.loras.switch(assigned)

    def generate(
        self, job: Job, on_step: StepCallback | None = None, clock: PhaseClock | None = None
    ) -> Generated:
        """``clock``: charged with ``denoise`` (the text encoder included) and ``decode``."""
        settings, spec = job.settings, self.spec
        plan = sampling(spec.model, settings)
        clock = clock or PhaseClock()
        started = time.perf_counter()

        def step_end(pipe, index, timestep, tensors):
            clock.lap("denoise")
            if on_step is not None:
                on_step(index, float(timestep), time.perf_counter() - started)
            return {}

        kwargs = dict(
            prompt=job.prompt,
            negative_prompt=job.negative_prompt or None,
            height=settings.target_height,
            width=settings.target_width,
            num_frames=settings.target_video_length,
            num_inference_steps=plan.steps,
            guidance_scale=plan.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="np",
            max_sequence_length=settings.text_len,
            callback_on_step_end=step_end,
        )
        if plan.guidance_scale_2 is not None:
            kwargs["guidance_scale_2"] = plan.guidance_scale_2
        if job.image_path is not None:
            from PIL import Image

            with Image.open(job.image_path) as image:
                kwargs["image"] = image.convert("RGB")
        with torch_threads(self.threads), torch.inference_mode():
            frames = self.pipe(**kwargs).frames[0]
        clock.lap("decode")
        frames = np.ascontiguousarray(frames, dtype=np.float32)
        return Generated(frames, frames_digest(frames))

    def digest(self) -> str:
        """sha256 of every transformer's weights (``loras.weights_digest``)."""
        return weights_digest((name, getattr(self.pipe, name)) for name in self.loras.handles)


def peak_memory(device: str) -> dict:
    """Peak resident memory of this process (and CUDA memory allocated on ``device``)."""
    peak = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        peak["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    return peak
