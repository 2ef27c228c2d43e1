"""A model folder loaded as a diffusers Wan pipeline on its device and in its dtype, with any
transformer replaced by one in Wan's original layout."""

from __future__ import annotations

import warnings

import torch

from ..io.reader import CheckpointIndex
from .folder import ModelFolder
from .original import load_original

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_pipeline(
    folder: ModelFolder, replacements: dict[str, CheckpointIndex], dtype: torch.dtype, device: str
):
    """``replacements``: component → the diffusers-keyed headers of an original-layout
    checkpoint that replaces it. The VAE runs in fp32 (diffusers' advice for Wan), everything
    else in ``dtype``. Returns the pipeline (a ``WanPipeline`` or ``WanImageToVideoPipeline``)."""
    import diffusers

    quiet()
    components = {
        name: load_original(folder.component(name), index, dtype, f"{name} of {folder.path}")
        for name, index in replacements.items()
    }
    cls = getattr(diffusers, folder.pipeline_class)
    dtypes = {"default": dtype, "vae": torch.float32}
    with warnings.catch_warnings():  # torch_dtype: every diffusers takes it; new ones warn
        warnings.simplefilter("ignore", FutureWarning)
        pipe = cls.from_pretrained(folder.path, torch_dtype=dtypes, **components)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe


def quiet() -> None:
    """No loading bars or advice from diffusers and transformers: the console shows progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.disable_progress_bar()
        logging.set_verbosity_error()
