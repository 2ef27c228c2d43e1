"""What a run reports about each LoRA it read (``merge``, ``resize``, ``verify``): its file,
strength, PEFT scaling, key count, how many weights it patches and every key it leaves out."""

from __future__ import annotations

from collections.abc import Sequence

from .inputs import LoraInput
from .keys import Unmatched


def lora_summaries(
    opened: Sequence[LoraInput], unmatched: Sequence[Sequence[Unmatched]]
) -> list[dict]:
    """One JSON-ready entry per LoRA; ``unmatched`` holds each LoRA's keys left out, in the
    same order (the plan's, which adds the keys its own checks refused to the mapping's)."""
    return [
        {
            "path": lora.label,
            "file": lora.file,
            "strength": lora.strength,
            "peft": lora.peft,
            "keys": len(lora.index.tensors),
            "patches": len(lora.mapping.patches),
            "unmatched": {u.lora_key: u.reason for u in left_out},
        }
        for lora, left_out in zip(opened, unmatched, strict=True)
    ]
