"""Resume of an interrupted merge: everything the output bytes depend on, hashed, and whether a
finished tensor's marker still vouches for the bytes in the temporary output.

A rerun with the same fingerprint keeps the temporary output (its header must match byte for
byte) and computes only the tensors without a valid marker; any change in inputs or options
starts the temporary output afresh."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .. import __version__
from ..io.layout import Slot
from ..io.reader import CheckpointIndex
from ..io.slots import slot_checksum
from ..lora.inputs import LoraInput
from ..run.device import device_type
from .plan import MergePlan


def _files(index: CheckpointIndex) -> dict:
    """Per file: size, header hash, modification time and inode (a file edited in place or
    replaced never matches)."""
    files = sorted({info.file for info in index.tensors.values()})
    stats = {f: os.stat(f) for f in files}
    return {
        os.path.basename(f): {
            **index.files.get(os.path.basename(f), {}),
            "mtime_ns": stats[f].st_mtime_ns,
            "inode": stats[f].st_ino,
        }
        for f in files
    }


def merge_components(
    plan: MergePlan, base: CheckpointIndex, loras: list[LoraInput], dev: str
) -> dict:
    """Everything the output bytes depend on, grouped so a change can be named. The device
    counts by its type (cpu or cuda: the merge's matmuls round differently on each), not its
    index: every GPU of one type is assumed to give the same bytes, so ``cuda:0`` and ``cuda``
    on the same GPU keep a merge's temporary output."""
    tasks = [
        [t.key, t.kind, t.out_dtype, [[p.lora, p.kind, repr(p.factor)] for p in t.patches]]
        for t in plan.tasks
    ]
    options = plan.options
    return {
        "versions": {
            "loraforge": __version__,
            "torch": torch.__version__,
            "device": device_type(dev),
        },
        "base": {"path": base.path, "files": _files(base)},
        "loras": [
            {"file": lora.file, "files": _files(lora.index), "strength": lora.strength}
            for lora in loras
        ],
        "options": {
            "alpha": options.alpha,
            "output_dtype": str(options.torch_dtype),
            "output_format": options.output_format,
            "max_shard_size": options.max_shard_size,
        },
        "tasks": hashlib.sha256(json.dumps(tasks).encode()).hexdigest(),
    }


def components_digest(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


_WHAT = {
    "versions": "loraforge, torch or the device",
    "base": "the base model",
    "loras": "the LoRAs or their strengths",
    "options": "the output options",
    "tasks": "the merge plan",
}


def changes_since(previous: dict | None, components: dict, where: str) -> list[str]:
    """What differs from the run that left ``where`` (each starts the output afresh)."""
    old = (previous or {}).get("components")
    if not old:
        return []
    changed = [_WHAT[k] for k in _WHAT if old.get(k) != components[k]]
    return [f"{', '.join(changed)} changed since the run that left {where}"] if changed else []


def marker_valid(marker: dict | None, fingerprint: str, slot: Slot) -> bool:
    """Whether ``marker`` vouches for the bytes now at ``slot`` under this plan."""
    return (
        marker is not None
        and marker.get("fingerprint") == fingerprint
        and marker.get("file") == os.path.basename(slot.file)
        and marker.get("offset") == slot.offset
        and marker.get("nbytes") == slot.entry.nbytes
        and marker.get("crc") == slot_checksum(slot)  # the bytes really are there
    )
