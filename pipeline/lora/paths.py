"""Every file a run reads for its LoRAs, for the run layer's path checks (nothing a run writes
may be one of them): each LoRA's files, its adapter directory and ``adapter_config.json``,
and the LoRA config file."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..run.paths import UserPath, checkpoint_paths
from .inputs import LoraInput


def lora_paths(opened: Sequence[LoraInput], config_file: str | None = None) -> list[UserPath]:
    paths: list[UserPath] = []
    for lora in opened:
        paths += checkpoint_paths("--lora-model", lora.index)
        if os.path.isdir(lora.label):
            paths.append(UserPath("--lora-model", lora.label))
        if lora.config:
            paths.append(UserPath("--lora-model", lora.config))
    if config_file:
        paths.append(UserPath("--config", config_file))
    return paths
