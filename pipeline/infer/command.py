"""``infer``: check every input and output → load the pipeline → apply the LoRAs → denoise
with a bar over the steps → decode → write the mp4 (and PNGs) under temporary names → publish
them with the JSON report (time per phase, peak memory, each LoRA with its strength and the keys
it left out, the config fields ignored)."""

from __future__ import annotations

import os

from ..run.clock import PhaseClock
from ..run.command import execute
from ..run.options import RunOptions
from ..run.paths import UserPath
from ..run.report import build_report
from ..run.session import Progress, Session
from ..runtime.deps import INFER, require
from ..runtime.loras import check_headers
from ..runtime.spec import (
    RuntimeOptions,
    check_image,
    lora_inputs,
    lora_specs,
    open_spec,
)
from ..runtime.video import FramesOutput, VideoOutput
from .options import InferOptions


def infer(
    *,
    runtime: RuntimeOptions,
    options: InferOptions,
    save_result_path: str,
    run: RunOptions | None = None,
    progress: Progress | None = None,
) -> dict:
    """Generate one video into ``save_result_path`` (``.mp4`` added when missing); return the
    report (also saved as JSON)."""
    require("infer", INFER)
    return execute(Inference(runtime, options), run or RunOptions(), save_result_path, progress)


def frames_dir(output: str) -> str:
    return os.path.splitext(output)[0] + "_frames"


class Inference:
    name = "infer"
    work = None
    output_format = "mp4"
    output_option = "--save_result_path"

    def __init__(self, runtime: RuntimeOptions, options: InferOptions):
        self.runtime, self.options = runtime, options

    def prepare(self, session: Session) -> None:
        options = self.options
        self.spec = spec = open_spec(self.runtime, session.device)
        self.loras, note = lora_specs(spec, list(options.lora_path), list(options.lora_strength))
        check_headers(spec.checkpoints, self.loras)
        self.image = check_image(options.image_path, spec.task)
        self.frames = FramesOutput(frames_dir(session.output)) if options.save_frames else None
        if self.frames is not None:
            self.frames.check()
        inputs = spec.inputs() + lora_inputs(self.loras)
        if self.image:
            inputs.append(UserPath("--image_path", self.image))
        outputs = [self.frames.path] if self.frames else []
        session.check_paths(inputs, outputs)
        notes = [note] if note else []
        if options.image_path and spec.task == "t2v":
            notes.append("--image_path is not used by --task t2v")
        notes += spec.notes
        for message in notes:
            session.emit("note", {"message": message})

    def begin(self, session: Session, previous: dict | None) -> dict:
        raise NotImplementedError("infer keeps no work directory")

    def run(self, session: Session) -> dict:
        from ..runtime.generate import Job, Runtime, peak_memory

        spec, clock = self.spec, PhaseClock()
        runtime = Runtime.load(spec)
        clock.lap("load")
        runtime.switch(self.loras)
        loras = runtime.loras.summaries()
        if loras:
            session.emit("loras", {"loras": loras})
        clock.lap("loras")
        settings = spec.settings
        session.start(
            tensors=settings.steps, total_bytes=0, done=0, done_bytes=0, changes=[], unit="steps"
        )
        steps = []

        def on_step(index: int, timestep: float, seconds: float) -> None:
            steps.append({"step": index, "timestep": timestep, "seconds": round(seconds, 4)})
            session.emit("step", steps[-1])

        job = Job(
            self.options.prompt,
            self.options.negative_prompt,
            self.options.seed,
            settings,
            self.image,
        )
        generated = runtime.generate(job, on_step, clock)
        session.emit("write", {"tensors": settings.steps})
        video = session.add_writer(VideoOutput(session.output))
        video.write(generated.frames, settings.fps)
        if self.frames is not None:
            session.add_writer(self.frames).write(generated.frames)
        clock.lap("write")
        frames, height, width, _ = generated.frames.shape
        extra = {
            "phases": {name: round(seconds, 3) for name, seconds in clock.seconds.items()},
            **peak_memory(spec.device),
            "video": {"frames": frames, "height": height, "width": width, "fps": settings.fps},
            "frames_sha256": generated.digest,
            "loras": loras,
            "held_bytes": runtime.loras.held_bytes,
            "steps": steps,
            "ignored_config_fields": list(settings.ignored),
        }
        inputs = {
            "model_path": spec.folder.path,
            "config_json": settings.path,
            "transformers": dict(spec.originals),
            "image_path": self.image,
        }
        options = {**self.runtime.to_dict(), **self.options.to_dict(), "device": spec.device}
        return build_report("infer", options, inputs, {}, extra, session.started)
