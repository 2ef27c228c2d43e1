"""``extract``: plan → compute missing tensors on Dask → write the output → report."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable

import torch

from .cluster import TaskCall, cluster_device, run_tasks
from .errors import OutputError, UsageError
from .export import export
from .faults import maybe_crash
from .gpu import select_gpus, visible_gpus
from .options import ExtractOptions
from .plan import ExtractionPlan, plan_extraction
from .reader import index_checkpoint
from .report import build_report, save_report
from .resume import Decision, decide, extract_fingerprint
from .tasks import pick_device, run_extract_task
from .workdir import RunLock, WorkDir

Progress = Callable[[str, dict], None]
SUFFIXES = {"safetensors": (".safetensors",), "pytorch": (".pt", ".pth")}


def output_path(output: str, output_format: str) -> str:
    """LightX2V's rule: add ``.safetensors``/``.pt`` when the name lacks a matching suffix."""
    output = os.path.abspath(os.path.expanduser(output))
    if not output.endswith(SUFFIXES[output_format]):
        output += SUFFIXES[output_format][0]
    return output


def check_output_location(output: str) -> None:
    """Fail before any work if the output cannot be written."""
    if os.path.isdir(output):
        raise OutputError("is a directory", path=output, hint="give a file name for --output")
    directory = os.path.dirname(output)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"cannot create the output directory ({e.strerror})",
            path=directory,
            hint="choose a writable --output location",
        ) from None
    if not os.access(directory, os.W_OK):
        raise OutputError(
            "output directory is not writable",
            path=directory,
            hint="choose a writable --output location",
        )


def resolve_device(device: str, *, scheduler: str | None = None, gpus: str | None = None) -> str:
    """The device tasks run on. With ``gpus``, ``cuda`` (each GPU worker sees its own GPU as
    ``cuda``); with a running cluster, the workers' device, not this machine's (``auto``:
    ``cuda`` when its workers declare a GPU)."""
    if gpus is not None:
        if scheduler:
            raise UsageError(
                "--gpus starts local GPU workers and cannot be combined with --scheduler",
                hint="start the cluster's workers one per GPU with --resources GPU=1",
            )
        if device not in ("auto", "cuda"):
            raise UsageError(
                f"--gpus picks the GPUs; --device {device} contradicts it",
                hint="drop --device, or pass --device cuda",
            )
        select_gpus(gpus, visible_gpus())
        return "cuda"
    if scheduler and (device in ("auto", "cpu") or device.startswith("cuda")):
        return cluster_device(scheduler, device)
    resolved = pick_device(device)
    if resolved.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"--device {device}: no CUDA device is visible", hint="use --device cpu or auto"
        )
    if not (resolved == "cpu" or resolved.startswith("cuda")):
        raise UsageError(f"unknown --device {device!r}; valid: auto, cpu, cuda, cuda:N")
    return resolved


def _input_changes(previous: dict | None, manifest: dict) -> list[str]:
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


def extract(
    *,
    source_model: str,
    target_model: str,
    output: str,
    options: ExtractOptions,
    source_type: str = "safetensors",
    target_type: str = "safetensors",
    work_dir: str | None = None,
    resume: bool = True,
    keep_work: bool = True,
    device: str = "auto",
    workers: int | None = None,
    scheduler: str | None = None,
    gpus: str | None = None,
    report_path: str | None = None,
    progress: Progress | None = None,
) -> dict:
    started = time.time()
    emit = progress or (lambda event, info: None)
    output = output_path(output, options.output_format)
    check_output_location(output)
    if options.output_format == "pytorch" and options.max_shard_size:
        raise UsageError("--max-shard-size needs --output-format safetensors")
    dev = resolve_device(device, scheduler=scheduler, gpus=gpus)
    devices = select_gpus(gpus, visible_gpus()) if gpus else None
    source = index_checkpoint(source_model, source_type)
    target = index_checkpoint(target_model, target_type)
    plan = plan_extraction(source, target, options)
    work = WorkDir(work_dir or output + ".work")
    lock = RunLock(work.path)
    lock.acquire()
    try:
        if not resume:
            shutil.rmtree(work.tensors, ignore_errors=True)
            shutil.rmtree(work.done, ignore_errors=True)
        work.create()
        manifest = {
            "command": "extract",
            "kernel": options.kernel.to_dict(),
            "inputs": {"source": source.fingerprint(), "target": target.fingerprint()},
        }
        previous = work.read_manifest()
        if previous and previous.get("command", "extract") != "extract":
            raise UsageError(
                f"work directory belongs to a {previous['command']} run",
                path=work.path,
                hint="pass another --work-dir",
            )
        changes = _input_changes(previous, manifest)
        work.write_manifest(manifest)
        report = _run(
            plan,
            source,
            target,
            work,
            output,
            dev,
            workers,
            scheduler,
            emit,
            changes,
            started,
            devices,
        )
    finally:
        lock.release()
    if not keep_work:
        shutil.rmtree(work.path, ignore_errors=True)
    report["summary"]["work_dir"] = work.path if keep_work else None
    save_report(report_path or os.path.splitext(output)[0] + ".report.json", report)
    return report


def _run(
    plan: ExtractionPlan,
    source,
    target,
    work: WorkDir,
    output: str,
    dev: str,
    workers: int | None,
    scheduler: str | None,
    emit: Progress,
    changes: list[str],
    started: float,
    gpus: list[str] | None = None,
) -> dict:
    kernel = plan.options.kernel
    phases = {"prepare": time.time() - started}
    fingerprints, decisions, markers = {}, {}, {}
    for task in plan.tasks:
        fingerprints[task.key] = extract_fingerprint(task, source, target, kernel)
        marker = work.read_marker(task.key)
        decisions[task.key] = decide(task, marker, fingerprints[task.key])
        if decisions[task.key].reuse:
            markers[task.key] = marker
    pending = [t for t in plan.tasks if not decisions[t.key].reuse]
    emit(
        "start",
        {
            "tensors": len(plan.tasks),
            "bytes": plan.total_bytes,
            "done": len(plan.tasks) - len(pending),
            "done_bytes": plan.total_bytes
            - sum(t.source.nbytes + t.target.nbytes for t in pending),
            "changes": changes,
            "work_dir": work.path,
        },
    )

    def compute_here(task) -> dict:
        return run_extract_task(task, work.path, dev, kernel, fingerprints[task.key])

    phases["resume_check"] = time.time() - started - sum(phases.values())
    _compute(
        pending,
        work,
        dev,
        kernel,
        fingerprints,
        markers,
        emit,
        workers=workers,
        device=dev,
        scheduler=scheduler,
        gpus=gpus,
    )
    phases["compute"] = time.time() - started - sum(phases.values())
    emit("write", {"tensors": len(plan.tasks)})
    files, stored = export(plan, markers, work, output, compute_here)
    phases["write"] = time.time() - started - sum(phases.values())
    tensors = {}
    for task in plan.tasks:
        marker, decision = markers[task.key], decisions[task.key]
        error, kernel_error, note = stored.get(task.key, (0.0, 0.0, None))
        entry = {
            "kind": "skipped" if marker["kind"] == "unchanged" else marker["kind"],
            "shape": list(task.shape),
            "rank": task.rank if marker["kind"] == "lowrank" else None,
            "rel_error": None if marker["kind"] == "unchanged" else error,
            "kernel_rel_error": None if marker["kind"] == "unchanged" else kernel_error,
            "seconds": marker.get("seconds"),
            "status": _status(decision, note),
        }
        notes = [
            n
            for n in (
                task.note,
                note,
                "unchanged (max |diff| <= 1e-8)" if marker["kind"] == "unchanged" else None,
            )
            if n
        ]
        if decision.sliced_from:
            notes.append(f"sliced from stored rank {decision.sliced_from}")
        if decision.reason:
            notes.append(f"recomputed: {decision.reason}")
        if notes:
            entry["note"] = "; ".join(notes)
        tensors[task.key] = entry
    for skipped in plan.skipped:
        tensors[skipped.key] = {"kind": "skipped", "note": skipped.reason, "status": "planned"}
    extra = {
        "files": files,
        "output": output,
        "device": dev,
        "computed": sum(1 for d in decisions.values() if not d.reuse),
        "reused": sum(1 for d in decisions.values() if d.reuse),
        "source_only": plan.source_only,
        "target_only": plan.target_only,
        "input_changes": changes,
        "phase_seconds": {k: round(v, 3) for k, v in phases.items()},
    }
    return build_report(
        "extract",
        plan.options.to_dict(),
        {"source": source.path, "target": target.path},
        tensors,
        extra,
        started,
    )


def _status(decision: Decision, note: str | None) -> str:
    if note:
        return "recomputed"
    if decision.reuse:
        return "sliced" if decision.sliced_from else "reused"
    return "computed"


def _compute(
    pending,
    work: WorkDir,
    dev: str,
    kernel,
    fingerprints: dict,
    markers: dict,
    emit: Progress,
    **cluster,
) -> None:
    calls = [
        TaskCall(
            task.name,
            run_extract_task,
            (task, work.path, dev, kernel, fingerprints[task.key]),
            uses_gpu=dev.startswith("cuda"),  # every task uses the device
        )
        for task in pending
    ]
    by_key = {task.name: task for task in pending}

    def finished(key: str, marker: dict) -> None:
        task = by_key[key]
        markers[task.key] = marker
        maybe_crash("compute", len(markers))
        emit("tensor", {"key": task.key, "bytes": task.source.nbytes + task.target.nbytes})

    run_tasks(
        calls, finished, on_cluster=lambda link: emit("cluster", {"dashboard": link}), **cluster
    )
