"""The request and response bodies of ``loraforge serve``, as LightX2V's server names them
(lightx2v/server/schema.py), plus ``lora_configs`` in a request.

No ``from __future__ import annotations`` here: FastAPI reads these annotations at runtime."""

import uuid

from pydantic import BaseModel, ConfigDict, Field


class LoraEntry(BaseModel):
    """One LoRA of a request's ``lora_configs``: a file (or PEFT directory) in ``--lora_dir``;
    ``name`` chooses a Wan 2.2 expert (``high_noise_model`` / ``low_noise_model``), none
    both."""

    model_config = ConfigDict(extra="forbid")

    path: str
    strength: float = Field(1.0, allow_inf_nan=False)
    name: str | None = None


class VideoTaskRequest(BaseModel):
    """LightX2V's ``VideoTaskRequest`` fields that a Wan T2V/I2V run uses. Fields a request
    leaves out take the server's config values (never an earlier request's); other LightX2V
    fields are accepted and listed in the task's ``ignored_fields``."""

    model_config = ConfigDict(extra="allow")

    task_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1)
    prompt: str = ""
    negative_prompt: str = ""
    image_path: str = ""
    save_result_path: str = ""
    infer_steps: int | None = Field(None, ge=1)
    target_video_length: int | None = Field(None, ge=1)
    target_shape: list[int] = Field(default_factory=list)  # [height, width]
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # none: a random seed, reported
    lora_name: str | None = None  # a file (or PEFT directory) in --lora_dir; none: no LoRA
    lora_strength: float = Field(1.0, allow_inf_nan=False)
    lora_configs: list[LoraEntry] | None = None  # several LoRAs (not in LightX2V)


class TaskResponse(BaseModel):
    task_id: str
    task_status: str
    save_result_path: str


class StopTaskResponse(BaseModel):
    stop_status: str
    reason: str
