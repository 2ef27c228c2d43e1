"""What ``loraforge infer`` generates, besides the model it loads (``RuntimeOptions``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class InferOptions:
    prompt: str = ""
    negative_prompt: str = ""
    image_path: str | None = None  # i2v
    seed: int = 42  # LightX2V's default
    lora_path: tuple[str, ...] = ()  # replaces the config's LoRAs when given
    lora_strength: tuple[float, ...] = ()  # none: 1.0; one: for all; else one per path
    save_frames: bool = False  # PNGs in <save_result_path stem>_frames/

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
