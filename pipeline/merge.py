"""``merge``: open the LoRAs → plan from headers → lay out the output → one Dask task per base
tensor writes its bytes in place → commit (fsync, rename) → report.

Resume: the work directory holds the plan's fingerprint (``run.json``) and one marker per tensor
written. A rerun with the same fingerprint keeps the temporary output (its header must match
byte for byte) and computes only the tensors without a marker; any change in inputs or options
starts the temporary output afresh."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable

import torch

from . import __version__
from .cluster import TaskCall, run_tasks
from .errors import LoraMismatch, UsageError
from .extract import check_output_location, output_path, resolve_device
from .faults import maybe_crash
from .gpu import select_gpus, visible_gpus
from .merge_config import MergeConfig
from .merge_inputs import LoraInput, open_lora
from .merge_plan import MergePlan, MergeTask, plan_merge
from .merge_task import run_merge_task
from .options import MergeOptions
from .reader import CheckpointIndex, index_checkpoint
from .report import build_report, save_report
from .shards import index_file_name, shard_file_names, split_shards
from .workdir import RunLock, WorkDir
from .writer import open_output, slot_crc32

Progress = Callable[[str, dict], None]
METADATA = {"format": "pt", "producer": "loraforge"}


def merge(
    *,
    source_model: str,
    loras: MergeConfig,
    output: str,
    options: MergeOptions,
    source_type: str = "safetensors",
    lora_type: str | None = None,
    work_dir: str | None = None,
    resume: bool = True,
    device: str = "auto",
    workers: int | None = None,
    scheduler: str | None = None,
    gpus: str | None = None,
    report_path: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """Merge ``loras`` into ``source_model``; return the report (also saved as JSON)."""
    started = time.time()
    emit = progress or (lambda event, info: None)
    output = output_path(output, options.output_format)
    check_output_location(output)
    dev = resolve_device(device, scheduler=scheduler, gpus=gpus)
    devices = select_gpus(gpus, visible_gpus()) if gpus else None
    base = index_checkpoint(source_model, source_type)
    shapes = {key: info.shape for key, info in base.tensors.items()}
    opened = [open_lora(s, shapes, lora_type, options.allow_nonfinite) for s in loras.loras]
    plan = plan_merge(base, opened, options)
    _check_not_an_input(output, plan, [base, *(lora.index for lora in opened)])
    if options.strict:
        _refuse_unmatched(opened, plan)
    summaries = [_lora_summary(lora, u) for lora, u in zip(opened, plan.unmatched, strict=True)]
    emit("loras", {"loras": summaries})

    work = WorkDir(work_dir or output + ".work")
    lock = RunLock(work.path)
    lock.acquire()
    try:
        previous = work.read_manifest()
        if previous and previous.get("command") != "merge":
            raise UsageError(
                f"work directory belongs to a {previous.get('command')} run",
                path=work.path,
                hint="pass another --work-dir",
            )
        components = _components(plan, base, opened, dev)
        digest = _digest(components)
        same = resume and previous is not None and previous.get("fingerprint") == digest
        changes = [] if same or not resume else _changes(previous, components, work.path)
        if not same:
            shutil.rmtree(work.done, ignore_errors=True)
        work.create()
        writer = open_output(
            output,
            options.output_format,
            plan.entries,
            options.max_shard_size,
            metadata=METADATA,
            reuse=same,
        )
        work.write_manifest({"command": "merge", "fingerprint": digest, "components": components})
        try:
            markers = _run(
                plan, writer, work, digest, dev, workers, scheduler, emit, changes, devices
            )
            emit("write", {"tensors": len(plan.tasks)})
            files = writer.commit()
        except BaseException:
            writer.close()  # the temporaries stay for a resumed run
            raise
        shutil.rmtree(work.done, ignore_errors=True)
        shutil.rmtree(work.tensors, ignore_errors=True)
        os.unlink(os.path.join(work.path, "run.json"))
    finally:
        lock.release()
    try:
        os.rmdir(work.path)
    except OSError:
        pass  # not empty: someone else's files
    report = _report(plan, base, opened, markers, files, output, dev, changes, started)
    save_report(report_path or os.path.splitext(output)[0] + ".report.json", report)
    return report


def _check_not_an_input(output: str, plan: MergePlan, indexes: list[CheckpointIndex]) -> None:
    groups = split_shards([(e.name, e.nbytes) for e in plan.entries], plan.options.max_shard_size)
    outputs = {*shard_file_names(output, len(groups)), index_file_name(output)}
    inputs = {os.path.realpath(i.file) for index in indexes for i in index.tensors.values()}
    for file in outputs:
        if os.path.realpath(file) in inputs:
            raise UsageError(
                "the output would overwrite an input", path=file, hint="choose another --output"
            )


def _lora_summary(lora: LoraInput, unmatched) -> dict:
    return {
        "path": lora.label,
        "file": lora.file,
        "strength": lora.strength,
        "peft": lora.peft,
        "keys": len(lora.index.tensors),
        "patches": len(lora.mapping.patches),
        "unmatched": {u.lora_key: u.reason for u in unmatched},
    }


def _refuse_unmatched(opened: list[LoraInput], plan: MergePlan) -> None:
    for lora, unmatched in zip(opened, plan.unmatched, strict=True):
        if unmatched:
            first = unmatched[0]
            raise LoraMismatch(
                f"{len(unmatched)} of its {len(lora.index.tensors)} keys would not be merged, "
                f"e.g. '{first.lora_key}': {first.reason}",
                path=lora.file,
                hint="without --strict they are skipped and listed in the report",
            )


# ---- resume ----
def _files(index: CheckpointIndex) -> dict:
    """Per file: size, header hash and modification time (a rewritten file never matches)."""
    files = sorted({info.file for info in index.tensors.values()})
    return {
        os.path.basename(f): {
            **index.files.get(os.path.basename(f), {}),
            "mtime_ns": os.stat(f).st_mtime_ns,
        }
        for f in files
    }


def _components(plan: MergePlan, base: CheckpointIndex, loras: list[LoraInput], dev: str) -> dict:
    """Everything the output bytes depend on, grouped so a change can be named."""
    tasks = [
        [t.key, t.kind, t.out_dtype, [[p.lora, p.kind, repr(p.factor)] for p in t.patches]]
        for t in plan.tasks
    ]
    options = plan.options
    return {
        "versions": {"loraforge": __version__, "torch": torch.__version__, "device": dev},
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


def _digest(components: dict) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()


_WHAT = {
    "versions": "loraforge, torch or the device",
    "base": "the base model",
    "loras": "the LoRAs or their strengths",
    "options": "the output options",
    "tasks": "the merge plan",
}


def _changes(previous: dict | None, components: dict, where: str) -> list[str]:
    """What differs from the run that left ``where`` (each starts the output afresh)."""
    old = (previous or {}).get("components")
    if not old:
        return []
    changed = [_WHAT[k] for k in _WHAT if old.get(k) != components[k]]
    return [f"{', '.join(changed)} changed since the run that left {where}"] if changed else []


def _valid(marker: dict | None, digest: str, slot) -> bool:
    return (
        marker is not None
        and marker.get("fingerprint") == digest
        and marker.get("file") == os.path.basename(slot.file)
        and marker.get("offset") == slot.offset
        and marker.get("nbytes") == slot.entry.nbytes
        and marker.get("crc") == slot_crc32(slot)  # the bytes really are there
    )


# ---- execution ----
def _run(
    plan, writer, work, digest, dev, workers, scheduler, emit, changes, gpus=None
) -> dict[str, dict]:
    markers: dict[str, dict] = {}
    for task in plan.tasks:
        marker = work.read_marker(task.key)
        if writer.final_file(task.key) in writer.reused and _valid(
            marker, digest, writer.slot(task.key)
        ):
            markers[task.key] = {**marker, "status": "reused"}
            writer.mark_written(task.key, marker.get("crc", 0))
    pending = [t for t in plan.tasks if t.key not in markers]
    emit(
        "start",
        {
            "tensors": len(plan.tasks),
            "bytes": plan.total_bytes,
            "done": len(markers),
            "done_bytes": plan.total_bytes - sum(t.read_bytes for t in pending),
            "changes": changes,
            "work_dir": work.path,
        },
    )
    _compute(
        pending,
        plan.options,
        writer,
        work,
        digest,
        dev,
        markers,
        emit,
        workers=workers,
        device=dev,
        scheduler=scheduler,
        gpus=gpus,
    )
    return markers


def _compute(
    pending: list[MergeTask], options, writer, work, digest, dev, markers, emit, **cluster
):
    calls = [
        TaskCall(
            task.name,
            run_merge_task,
            (
                task,
                writer.slot(task.key),
                work.path,
                dev,
                {"fingerprint": digest},
                options.allow_nonfinite,
            ),
            uses_gpu=dev.startswith("cuda") and task.kind == "merged",
        )
        for task in pending
    ]
    by_key = {task.name: task for task in pending}

    def finished(key: str, result: dict) -> None:
        task = by_key[key]
        marker = markers[task.key] = {**result, "status": "computed"}
        writer.mark_written(task.key, marker["crc"])
        emit("tensor", {"key": task.key, "bytes": task.read_bytes})
        maybe_crash("compute", len(markers))

    run_tasks(
        calls, finished, on_cluster=lambda link: emit("cluster", {"dashboard": link}), **cluster
    )


# ---- report ----
def _report(plan, base, opened, markers, files, output, dev, changes, started) -> dict:
    tensors = {}
    for task in plan.tasks:
        marker = markers[task.key]
        tensors[task.key] = {
            "kind": task.kind,
            "shape": list(task.base.shape),
            "dtype": task.out_dtype,
            "loras": [opened[p.lora].label for p in task.patches],
            "seconds": marker.get("seconds"),
            "status": marker["status"],
        }
    extra = {
        "files": files,
        "output": output,
        "device": dev,
        "computed": sum(1 for m in markers.values() if m["status"] == "computed"),
        "reused": sum(1 for m in markers.values() if m["status"] == "reused"),
        "loras": [_lora_summary(lora, u) for lora, u in zip(opened, plan.unmatched, strict=True)],
        "input_changes": changes,
        "work_dir": None,
    }
    inputs = {"source": base.path, "loras": [lora.label for lora in opened]}
    return build_report("merge", plan.options.to_dict(), inputs, tensors, extra, started)
