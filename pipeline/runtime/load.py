"""A model folder loaded as a diffusers Wan pipeline on its device and in its dtype, with any
transformer replaced by one in Wan's original layout, and for each transformer the checkpoint
its weights came from (what ``loraforge.apply`` re-reads originals from instead of copying)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from ..errors import CheckpointFormatError, CheckpointNotFound
from ..io.reader import CheckpointIndex, index_checkpoint
from .folder import ModelFolder
from .original import load_original

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Loaded:
    pipe: object  # WanPipeline | WanImageToVideoPipeline
    checkpoints: dict[str, CheckpointIndex | None]  # per transformer; None: not re-readable
    notes: list[str]


def load_pipeline(
    folder: ModelFolder, originals: dict[str, str], dtype: torch.dtype, device: str
) -> Loaded:
    """``originals``: component → an original-layout checkpoint that replaces it. The VAE runs
    in fp32 (diffusers' advice for Wan), everything else in ``dtype``."""
    import diffusers

    _quiet()
    components, checkpoints, notes = {}, {}, []
    for name, path in originals.items():
        what = f"{name} of {folder.path}"
        components[name], checkpoints[name] = load_original(
            folder.component(name), path, dtype, what
        )
    cls = getattr(diffusers, folder.pipeline_class)
    dtypes = {"default": dtype, "vae": torch.float32}
    with warnings.catch_warnings():  # torch_dtype: every diffusers takes it; new ones warn
        warnings.simplefilter("ignore", FutureWarning)
        pipe = cls.from_pretrained(folder.path, torch_dtype=dtypes, **components)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for name in folder.transformers:
        if name not in checkpoints:
            checkpoints[name] = _folder_checkpoint(folder.component(name), notes)
    return Loaded(pipe, checkpoints, notes)


def _quiet() -> None:
    """No loading bars or advice from diffusers and transformers: the console shows progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.disable_progress_bar()
        logging.set_verbosity_error()


def _folder_checkpoint(directory: str, notes: list[str]) -> CheckpointIndex | None:
    """The safetensors files of a folder's transformer; None (originals are then copied) for
    a folder holding other formats."""
    try:
        return index_checkpoint(directory)
    except (CheckpointNotFound, CheckpointFormatError) as e:
        notes.append(
            f"{os.path.basename(directory)}: weights not re-readable ({e}); LoRAs keep copies "
            "of the weights they patch"
        )
        return None
