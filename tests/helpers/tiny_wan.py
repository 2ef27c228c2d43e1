"""The tiny random Wan sample (scripts/wan/make_tiny_sample.py, the one builder the README
command uses too), built once per test session, and small helpers for inference tests."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILDER = os.path.join(ROOT, "scripts", "wan", "make_tiny_sample.py")
PROMPT = "a red robot runs on the sea"


def builder():
    spec = importlib.util.spec_from_file_location("make_tiny_sample", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_mp4(path: str) -> np.ndarray:
    """The decoded frames of an mp4, (frames, height, width, 3) uint8."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path)
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(data, np.uint8).reshape(height, width, 3) for data in reader]
    return np.stack(frames)
