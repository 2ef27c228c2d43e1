"""Fingerprints of what produced an intermediate, and the reuse decision for each task.

A finished tensor's marker holds two things: the fingerprint of what decides its numbers (the
tensors' names, dtypes and shapes, the planned kind, the loraforge version, and for a low-rank
tensor the kernel and the device type it ran on) and, per side, what the task read: the file's
stat (size, mtime_ns, inode) taken before the read and the CRC-32C of the tensor's stored
bytes. A resume reuses the tensor when the fingerprint matches and each file's stat is
unchanged; when a stat changed, it re-hashes that tensor's bytes in that file and reuses it
only if the CRC-32C still matches."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loraforge.kernels import sketch_dtype

from .. import __version__
from ..io.fingerprint import file_stat, stored_crc32c
from ..io.reader import TensorInfo
from ..run.device import device_type
from .options import KernelOptions
from .plan import ExtractTask

SIDES = ("source", "target")
STAT_FIELDS = ("size", "mtime_ns", "inode")


def tensor_fingerprint(info: TensorInfo) -> dict:
    """What identifies one side's tensor: its file's name, dtype and shape (its bytes are
    vouched for apart, by stat and CRC-32C)."""
    return {"file": os.path.basename(info.file), "dtype": info.dtype, "shape": list(info.shape)}


def extract_fingerprint(task: ExtractTask, kernel: KernelOptions, device: str) -> dict:
    """What decides a task's numbers. ``device`` (cpu, cuda or cuda:N) counts for low-rank
    tensors only, and only by its type: the randomized kernel draws its test matrix from the
    device's own generator (a CPU and a CUDA stream differ for the same seed) and the device's
    GEMM/QR round differently, so factors from a CPU run and a GPU run must not be mixed in one
    output. The GPU index is left out: every GPU of one type is assumed to give the same
    stream and the same bytes (the tests compare ``--gpus all`` with one GPU), so a resume on
    another GPU, or ``cuda`` after ``cuda:0``, reuses them. A diff (and an unchanged tensor) is
    exact fp32 subtraction, the same bits on any device, so it stays reusable across devices.
    The sketch precision counts as ``auto`` resolves it on ``device`` (bf16 or fp32): it
    decides the numbers, and ``auto`` means either on different machines."""
    fingerprint = {
        "loraforge": __version__,
        "key": task.key,
        "kind": task.kind,
        "source": tensor_fingerprint(task.source),
        "target": tensor_fingerprint(task.target),
    }
    if task.kind == "lowrank":  # the rank is checked apart: a larger stored rank can be sliced
        fingerprint["kernel"] = {
            "method": kernel.method,
            "oversample": kernel.oversample,
            "n_iter": kernel.n_iter,
        }
        if kernel.n_iter is None:  # adaptive iterations: the stopping rule decides the numbers
            fingerprint["kernel"].update(tol=kernel.tol, max_iter=kernel.max_iter)
        if kernel.method == "randomized":  # as resolved here: auto is bf16 on some devices only
            low = sketch_dtype(kernel.sketch, device)
            fingerprint["kernel"]["sketch"] = "bf16" if low == torch.bfloat16 else "fp32"
        fingerprint["device"] = device_type(device)
    return fingerprint


def read_record(before: dict, crc: int, after: dict) -> dict:
    """The marker's record of one side: the stat taken before the read and the CRC-32C of the
    bytes read, or, when the file changed while it was read (``after`` differs), neither."""
    if after != before:
        return {"changed_while_read": True}
    return {**before, "crc32c": crc}


_WHAT = {
    "source": "source tensor changed",
    "target": "target tensor changed",
    "kernel": "kernel parameters changed",
    "loraforge": "loraforge version changed",
    "kind": "planned kind changed",
}


def _device_change(old: str | None, new: str) -> str:
    if old is None:  # a marker from before the device was recorded: where it ran is unknown
        return f"device not recorded (older loraforge), this run uses {new}"
    return f"computed on {old}, this run uses {new}"


@dataclass(frozen=True)
class Decision:
    reuse: bool
    reason: str | None = None  # why it must be computed again (None: never computed)
    sliced_from: int | None = None  # stored rank, when larger than the one asked for
    note: str | None = None  # how a reused tensor was vouched for, when not by stat alone
    rehashed: tuple[str, ...] = ()  # sides whose file stat changed and whose CRC matched


def decide(
    task: ExtractTask,
    marker: dict | None,
    fingerprint: dict,
    stats: dict[str, dict],
    crc: Callable[[str], int],
) -> Decision:
    """Reuse or recompute one task. ``stats`` holds each side's current file stat
    (``file_stat``); ``crc(side)`` re-hashes that side's tensor and is called only for a side
    whose stat differs from the marker's."""
    if marker is None:
        return Decision(False)
    inputs = marker.get("inputs")
    if not isinstance(inputs, dict):  # older markers hashed three sampled windows instead
        return Decision(False, "written by an older loraforge")
    old = marker.get("fingerprint", {})
    changed = []
    for k in fingerprint:
        if old.get(k) == fingerprint[k]:
            continue
        if k == "device":
            if marker.get("kind") != "unchanged":  # "unchanged" was an exact test: any device
                changed.append(_device_change(old.get(k), fingerprint[k]))
        else:
            changed.append(_WHAT.get(k, f"{k} changed"))
    if changed:
        return Decision(False, ", ".join(changed))
    stored = int(marker.get("rank") or 0)
    if marker.get("kind") == "lowrank" and stored < task.rank:
        return Decision(False, f"stored rank {stored} < requested {task.rank}")
    rehashed = []
    for side in SIDES:
        record = inputs.get(side) or {}
        if all(k in record for k in STAT_FIELDS) and all(
            record[k] == stats[side][k] for k in STAT_FIELDS
        ):
            continue
        if record.get("changed_while_read"):
            return Decision(False, f"{side} file changed while it was read")
        if record.get("crc32c") is None:
            return Decision(False, f"no CRC-32C of the {side} tensor recorded")
        if crc(side) != record["crc32c"]:
            changed.append(_WHAT[side])
        else:
            rehashed.append(side)
    if changed:
        return Decision(False, ", ".join(changed))
    note = (
        f"{' and '.join(rehashed)} file changed on disk, tensor bytes unchanged (CRC-32C)"
        if rehashed
        else None
    )
    sliced = stored if marker.get("kind") == "lowrank" and stored > task.rank else None
    return Decision(True, sliced_from=sliced, note=note, rehashed=tuple(rehashed))


def refreshed_marker(marker: dict, decision: Decision, stats: dict[str, dict]) -> dict | None:
    """For a tensor reused after a re-hash: its marker with the current stats of the re-hashed
    files (taken before the re-hash), so the next resume trusts the stat again; else None."""
    if not decision.reuse or not decision.rehashed:
        return None
    inputs = {**marker["inputs"]}
    for side in decision.rehashed:
        inputs[side] = {**inputs[side], **stats[side]}
    return {**marker, "inputs": inputs}


def input_changes(previous: dict | None, manifest: dict) -> list[str]:
    """What differs from the run that left the manifest ``previous``: notes for the user."""
    if not previous:
        return []
    notes = []
    for side in SIDES:
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
    old_device, new_device = previous.get("device"), manifest.get("device")
    if old_device and new_device and old_device != new_device:
        notes.append(f"device changed: {old_device} → {new_device} (low-rank tensors recomputed)")
    return notes


def resume_decisions(plan, work, device: str) -> tuple[dict, dict[str, Decision], dict]:
    """Per task of ``plan`` run on ``device``: its fingerprint, its ``Decision`` against the
    marker in ``work``, and (for reused tasks) the marker. A tensor reused after a re-hash gets
    its marker refreshed with the current stats, so the next resume trusts them again."""
    kernel = plan.options.kernel
    fingerprints, decisions, markers = {}, {}, {}
    # Every input file's stat, taken before any of its tensors is re-hashed.
    files = {info.file for task in plan.tasks for info in (task.source, task.target)}
    stats = {file: file_stat(file) for file in sorted(files)}
    stored = work.markers()

    def resume_decision(task) -> tuple[dict, dict | None, Decision]:
        fingerprint = extract_fingerprint(task, kernel, device)
        marker = stored.get(task.key)
        now = {side: stats[getattr(task, side).file] for side in SIDES}
        decision = decide(
            task, marker, fingerprint, now, lambda side: stored_crc32c(getattr(task, side))
        )
        refreshed = refreshed_marker(marker, decision, now)
        if refreshed is not None:  # re-hashed: the next resume trusts the new stats
            work.write_marker(task.key, refreshed)
            marker = refreshed
        return fingerprint, marker, decision

    # Threads: a re-hash (a file's stat changed) faults its pages in outside the GIL
    # (io.reader.prefault), so several tensors are re-hashed side by side.
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    try:
        for task, (fingerprint, marker, decision) in zip(
            plan.tasks, pool.map(resume_decision, plan.tasks), strict=True
        ):
            fingerprints[task.key], decisions[task.key] = fingerprint, decision
            if decision.reuse:
                markers[task.key] = marker
    finally:
        pool.shutdown(cancel_futures=True)  # Ctrl-C: no further re-hash starts
    return fingerprints, decisions, markers
