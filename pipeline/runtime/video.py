"""A run's frames written: an mp4 (H.264 through imageio-ffmpeg's bundled ffmpeg) and, on
request, one PNG per frame, each under a hidden temporary name and renamed into place when
complete, so nothing at the output is ever half-written. The writers are outputs of a
``Session`` (seal, publish, abort) and serve the server's tasks alike.

Frames are the pipeline's floats in [0, 1], shape (frames, height, width, 3); written as
round(255·x). ``frames_digest`` is the sha256 of those floats, before any rounding or
encoding: equal digests, bit-identical outputs."""

from __future__ import annotations

import hashlib
import os
import re
import shutil

import numpy as np

from ..errors import OutputError
from ..io.atomic import make_parent, remove_quietly, temporary_name

FRAME = re.compile(r"frame_\d{5}\.png")


def frames_digest(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames, dtype=np.float32).tobytes()).hexdigest()


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(frames * 255.0), 0, 255).astype(np.uint8)


class VideoOutput:
    """The mp4 at ``path``."""

    def __init__(self, path: str):
        self.path = path
        self.temporary = temporary_name(path)
        self.final_files = [path]

    @property
    def temporaries(self) -> list[str]:
        return [self.temporary] if os.path.exists(self.temporary) else []

    def write(self, frames: np.ndarray, fps: int) -> None:
        import imageio_ffmpeg

        make_parent(self.path)
        pixels = to_uint8(frames)
        writer = imageio_ffmpeg.write_frames(
            self.temporary,
            (pixels.shape[2], pixels.shape[1]),  # (width, height)
            fps=fps,
            codec="libx264",
            quality=8,
            macro_block_size=1,  # Wan's sizes are multiples of 16 already
            output_params=["-f", "mp4"],  # the temporary name has no .mp4 to go by
            ffmpeg_log_level="error",
        )
        writer.send(None)
        try:
            for frame in pixels:
                writer.send(np.ascontiguousarray(frame))
        finally:
            writer.close()

    def seal(self) -> None:
        with open(self.temporary, "rb") as f:
            os.fsync(f.fileno())

    def publish(self) -> list[str]:
        os.replace(self.temporary, self.path)
        return self.final_files

    def abort(self) -> None:
        remove_quietly(self.temporary)

    close = abort


class FramesOutput:
    """One PNG per frame (``frame_00000.png``, ...) in the directory ``path``. A directory
    already there is replaced only if it holds nothing but such frames (a previous run's):
    ``check`` refuses any other before the run starts. The previous frames are moved aside to
    ``old`` while the new ones are renamed in; an ``old`` a crashed run left is removed first."""

    def __init__(self, path: str):
        self.path = path
        self.temporary = temporary_name(path)
        self.old = path + ".old.partial"
        self.final_files = [path]

    @property
    def temporaries(self) -> list[str]:
        return [self.temporary] if os.path.exists(self.temporary) else []

    def check(self) -> None:
        for path in (self.path, self.old):
            if os.path.lexists(path) and not _only_frames(path):
                raise OutputError(
                    "exists and holds other files than frame_NNNNN.png",
                    path=path,
                    hint="remove it, or choose another --save_result_path",
                )

    def write(self, frames: np.ndarray) -> None:
        from PIL import Image

        shutil.rmtree(self.temporary, ignore_errors=True)
        os.makedirs(self.temporary)
        for i, frame in enumerate(to_uint8(frames)):
            Image.fromarray(frame).save(os.path.join(self.temporary, f"frame_{i:05d}.png"))

    def seal(self) -> None:
        self.check()

    def publish(self) -> list[str]:
        shutil.rmtree(self.old, ignore_errors=True)  # frames only: ``check`` ran at ``seal``
        if os.path.lexists(self.path):
            os.replace(self.path, self.old)
        os.replace(self.temporary, self.path)
        shutil.rmtree(self.old, ignore_errors=True)
        return self.final_files

    def abort(self) -> None:
        shutil.rmtree(self.temporary, ignore_errors=True)

    close = abort


def _only_frames(path: str) -> bool:
    return (
        os.path.isdir(path)
        and not os.path.islink(path)
        and all(FRAME.fullmatch(name) for name in os.listdir(path))
    )
