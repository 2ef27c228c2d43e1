"""Resume of a resize: a stored result is reused when its marker's fingerprint matches what
would produce it now (loraforge version, target, kind, and per patch its factor and each LoRA
tensor's name, dtype, shape and its file's size, mtime and inode). The rank rule and output
options are not in it: they are decided at export from the stored spectrum."""

from __future__ import annotations

import os

from .. import __version__
from ..workdir import WorkDir
from .plan import ResizePlan, ResizeTask


def _stat(path: str, cache: dict) -> dict:
    if path not in cache:
        st = os.stat(path)
        cache[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    return cache[path]


def resize_fingerprint(task: ResizeTask, stats: dict) -> dict:
    return {
        "loraforge": __version__,
        "key": task.key,
        "kind": task.kind,
        "patches": [
            {
                "lora": p.lora,
                "factor": repr(p.factor),
                "tensors": [
                    [t.key, os.path.basename(t.file), t.dtype, list(t.shape), _stat(t.file, stats)]
                    for t in p.tensors
                ],
            }
            for p in task.patches
        ],
    }


def _why(old: dict, new: dict) -> str:
    if old.get("loraforge") != new["loraforge"]:
        return "loraforge version changed"
    if old.get("kind") != new["kind"]:
        return "planned kind changed"
    old_patches = old.get("patches") or []
    if [p.get("factor") for p in old_patches] != [p["factor"] for p in new["patches"]]:
        return "strengths or scales changed"
    return "LoRA tensors or files changed"


def resume_decisions(plan: ResizePlan, work: WorkDir) -> tuple[dict, dict, dict]:
    """Per task: its fingerprint, why it must be computed (None: reuse; "" never computed),
    and, for reused tasks, the marker."""
    stats: dict = {}
    fingerprints, reasons, markers = {}, {}, {}
    stored = work.markers()
    for task in plan.tasks:
        fingerprint = fingerprints[task.key] = resize_fingerprint(task, stats)
        marker = stored.get(task.key)
        if marker is None:
            reasons[task.key] = ""
        elif marker.get("fingerprint") != fingerprint:
            reasons[task.key] = _why(marker.get("fingerprint") or {}, fingerprint)
        else:
            reasons[task.key] = None
            markers[task.key] = marker
    return fingerprints, reasons, markers
