"""What ``inspect`` looks at, from headers only: the LoRA's modules by its own names (or, with a
base, which base tensor each patches), the ``.alpha`` values, dtypes and sizes."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from ..errors import CheckpointNotFound
from ..io.reader import CheckpointIndex, index_checkpoint
from ..lora.inputs import OpenedLora, read_lora
from ..lora.keys import KOHYA_PREFIXES, LoraMapping, Unmatched, map_lora
from ..lora.modules import LoraModule, group_lora


@dataclass(frozen=True)
class InspectPlan:
    path: str  # as given, resolved
    lora: OpenedLora
    modules: list[LoraModule]
    unmatched: list[Unmatched]  # keys in no module
    base: CheckpointIndex | None
    mapping: LoraMapping | None  # with a base: which base tensor each key patches


def plan_inspect(
    path: str,
    base: str | None = None,
    lora_type: str | None = None,
    base_type: str | None = None,
) -> InspectPlan:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointNotFound("LoRA not found", path=path)
    lora = read_lora(path, lora_type, allow_nonfinite=True)  # inspect shows them instead
    shapes = {key: info.shape for key, info in lora.index.tensors.items()}
    grouped = group_lora(shapes, alphas=lora.alphas, peft_config=lora.peft, source=lora.file)
    base_index = mapping = None
    if base is not None:
        base_index = index_checkpoint(base, base_type)
        base_shapes = {key: info.shape for key, info in base_index.tensors.items()}
        mapping = map_lora(
            shapes, base_shapes, alphas=lora.alphas, peft_config=lora.peft, source=lora.file
        )
    return InspectPlan(path, lora, grouped.modules, grouped.unmatched, base_index, mapping)


def module_naming(module: LoraModule, peft_dir: bool) -> str:
    """The ecosystem a module's key names come from (``--key-style`` names where one fits):
    lightx2v (``diffusion_model.`` + lora_up/lora_down, .diff), kohya (``lora_unet_...``),
    peft (``base_model.model.`` + lora_A/lora_B, or an adapter directory), diffusers
    (``transformer.`` + lora_A/lora_B, or lora_linear_layer); else the suffixes themselves."""
    name, naming = module.module, module.naming
    if naming in ("lora_up", "diff", "diff_b", "diff_m"):
        if name.startswith(KOHYA_PREFIXES):
            return "kohya"
        if name.startswith("diffusion_model."):
            return "lightx2v"
        return "lora_up/lora_down" if naming == "lora_up" else "diff (no prefix)"
    if naming in ("peft", "peft_default", "mochi"):
        if peft_dir or name.startswith("base_model.model."):
            return "peft"
        if name.startswith("transformer."):
            return "diffusers"
        return "lora_A/lora_B"
    if naming == "diffusers":
        return "diffusers"
    return {"_lora": "_lora.up/_lora.down", "lora.up": "lora.up/lora.down"}[naming]


def namings(plan: InspectPlan) -> Counter:
    peft_dir = plan.lora.config is not None
    return Counter(module_naming(m, peft_dir) for m in plan.modules)
