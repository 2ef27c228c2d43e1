"""A transformer in Wan's original layout (one file or a shard directory, as LightX2V and ComfyUI
users hold it) loaded in place of a model folder's own: each name renamed to diffusers' through
the layout table (``lora/layouts.py``), every tensor of the model present with its shape and
nothing else, or a one-line refusal naming what does not fit.

The model is built from the folder's ``config.json`` with its parameters on the meta device
(accelerate's ``init_empty_weights``: no random initialisation of billions of weights, buffers
computed as usual), and the checkpoint's tensors, copied and cast, become its parameters: in
``dtype``, except those diffusers keeps in fp32 (``_keep_in_fp32_modules``), as
``from_pretrained`` would load them."""

from __future__ import annotations

import torch

from ..errors import ModelMismatch
from ..io.reader import CheckpointIndex, index_checkpoint, load_tensor, load_weight
from ..lora.layouts import DIFFUSERS, renamed, strip_wrappers


def diffusers_index(path: str) -> CheckpointIndex:
    """``path``'s headers with its tensors keyed by diffusers names (each ``TensorInfo`` still
    names its stored key): what the model's state dict is matched against, and what
    ``loraforge.apply`` re-reads originals from."""
    index = index_checkpoint(path)
    tensors = {}
    for key, info in index.tensors.items():
        if key in index.fp8.companions:  # a scale or marker: part of its weight's value
            continue
        bare = strip_wrappers(key)
        name = renamed(bare, DIFFUSERS) or bare
        if name in tensors:
            raise ModelMismatch(
                f"two tensors are the same diffusers tensor {name!r}: "
                f"{tensors[name].key!r} and {key!r}",
                path=index.path,
            )
        tensors[name] = info
    return CheckpointIndex(index.path, index.format, tensors, index.files, index.fp8)


def check_fits(index: CheckpointIndex, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Refuse, in one line, a checkpoint whose tensors are not exactly the model's."""
    missing = sorted(set(shapes) - set(index.tensors))
    extra = sorted(set(index.tensors) - set(shapes))
    wrong = sorted(
        k for k in set(shapes) & set(index.tensors) if index.tensors[k].shape != shapes[k]
    )
    if not (missing or extra or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's tensors missing (e.g. {missing[0]})")
    if extra:
        stored = index.tensors[extra[0]].key
        parts.append(f"{len(extra)} tensors the model does not have (e.g. {stored})")
    if wrong:
        key = wrong[0]
        got = "x".join(map(str, index.tensors[key].shape))
        parts.append(
            f"{len(wrong)} of another shape (e.g. {index.tensors[key].key}: {got}, the model "
            f"has {'x'.join(map(str, shapes[key]))})"
        )
    raise ModelMismatch(
        f"does not fit {what}: {'; '.join(parts)}",
        path=index.path,
        hint="pass the transformer this model folder was made for, in Wan's original or "
        "diffusers' naming",
    )


def load_original(component: str, index: CheckpointIndex, dtype: torch.dtype, what: str):
    """The ``WanTransformer3DModel`` of ``component`` (its folder's config) with the weights
    of an original-layout checkpoint, from its ``diffusers_index``."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    config = WanTransformer3DModel.load_config(component)
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel.from_config(config)
    shapes = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    check_fits(index, shapes, what)
    fp32 = tuple(model._keep_in_fp32_modules or ())  # as from_pretrained keeps them
    state = {
        key: _load(info, torch.float32 if set(key.split(".")) & set(fp32) else dtype)
        for key, info in index.tensors.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _load(info, dtype: torch.dtype) -> torch.Tensor:
    if info.scale is not None:
        return load_weight(info).to(dtype)
    return load_tensor(info, dtype if info.is_float else None)
