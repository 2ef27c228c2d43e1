"""Fingerprints of what produced an intermediate, and the reuse decision for each task."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import __version__
from ..io.reader import CheckpointIndex, TensorInfo, sample_digest
from .options import KernelOptions
from .plan import ExtractTask


def tensor_fingerprint(info: TensorInfo, index: CheckpointIndex) -> dict:
    """File name, size and header hash of the file holding the tensor, the tensor's dtype and
    shape, and a hash of three small windows of its bytes (no full read)."""
    name = os.path.basename(info.file)
    return {
        "file": name,
        **index.files[name],
        "dtype": info.dtype,
        "shape": list(info.shape),
        "sample_sha256": sample_digest(info),
    }


def extract_fingerprint(
    task: ExtractTask, source: CheckpointIndex, target: CheckpointIndex, kernel: KernelOptions
) -> dict:
    fingerprint = {
        "loraforge": __version__,
        "key": task.key,
        "kind": task.kind,
        "source": tensor_fingerprint(task.source, source),
        "target": tensor_fingerprint(task.target, target),
    }
    if task.kind == "lowrank":  # the rank is checked apart: a larger stored rank can be sliced
        fingerprint["kernel"] = {
            "method": kernel.method,
            "oversample": kernel.oversample,
            "n_iter": kernel.n_iter,
        }
    return fingerprint


_WHAT = {
    "source": "source tensor changed",
    "target": "target tensor changed",
    "kernel": "kernel parameters changed",
    "loraforge": "loraforge version changed",
    "kind": "planned kind changed",
}


@dataclass(frozen=True)
class Decision:
    reuse: bool
    reason: str | None = None  # why it must be computed again (None: never computed)
    sliced_from: int | None = None  # stored rank, when larger than the one asked for


def decide(task: ExtractTask, marker: dict | None, fingerprint: dict) -> Decision:
    if marker is None:
        return Decision(False)
    old = marker.get("fingerprint", {})
    changed = [_WHAT.get(k, f"{k} changed") for k in fingerprint if old.get(k) != fingerprint[k]]
    if changed:
        return Decision(False, ", ".join(changed))
    if marker.get("kind") == "lowrank":
        stored = int(marker.get("rank", 0))
        if stored < task.rank:
            return Decision(False, f"stored rank {stored} < requested {task.rank}")
        if stored > task.rank:
            return Decision(True, sliced_from=stored)
    return Decision(True)


def input_changes(previous: dict | None, manifest: dict) -> list[str]:
    """What differs from the run that left the manifest ``previous``: notes for the user."""
    if not previous:
        return []
    notes = []
    for side in ("source", "target"):
        old, new = previous.get("inputs", {}).get(side), manifest["inputs"][side]
        if old and old != new:
            noted = sorted(
                set(old.get("files", {})) ^ set(new.get("files", {}))
                | {
                    f
                    for f in new.get("files", {})
                    if old.get("files", {}).get(f) != new["files"][f]
                }
            )
            notes.append(f"{side} model changed ({', '.join(noted) or old.get('path')})")
    if previous.get("kernel") != manifest["kernel"]:
        notes.append(f"kernel parameters changed: {previous.get('kernel')} → {manifest['kernel']}")
    return notes
