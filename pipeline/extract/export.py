"""The write stage of an extraction: fp32 intermediates → cast → output file(s).

Runs where the output is (the client). Only finished results are written, in key order, one
tensor in memory at a time; the error reported per tensor is that of what is stored, after the
cast to the output dtype."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from loraforge.kernels import product_distance_sq, squared_norm, truncated_residual_sq
from loraforge.stages.cast import cast

from ..io import safetensors_format as stf
from ..io.layout import OutputEntry
from ..io.writer import open_output
from ..run.faults import maybe_crash
from ..workdir import CorruptEntry, WorkDir
from .options import ExtractOptions
from .plan import ExtractionPlan, ExtractTask


def planned_entries(plan: ExtractionPlan, markers: dict[str, dict]) -> list[OutputEntry]:
    code = stf.CODE_BY_DTYPE[plan.options.torch_dtype]
    entries = []
    for task in plan.tasks:
        kind = markers[task.key]["kind"]
        if kind == "lowrank":
            out, inp = task.shape
            entries += [
                OutputEntry(task.outputs["up"], code, (out, task.rank)),
                OutputEntry(task.outputs["down"], code, (task.rank, inp)),
                OutputEntry(task.outputs["alpha"], code, ()),
            ]
        elif kind == "diff":
            entries.append(OutputEntry(task.outputs["diff"], code, task.shape))
    return sorted(entries, key=lambda e: e.name)


def _stored_lowrank(
    task: ExtractTask, arrays: dict, attributes: dict, marker: dict, dtype: torch.dtype
):
    r = task.rank
    up = torch.from_numpy(arrays["up"][:, :r])
    down = torch.from_numpy(arrays["down"][:r])
    up_out, down_out = cast(up, dtype), cast(down, dtype)
    sq_norm = float(marker["sq_norm"])
    singular_values = attributes["up"]["singular_values"]
    residual = truncated_residual_sq(float(marker["residual_sq"]), singular_values, r)
    rounding = product_distance_sq(up_out.float(), down_out.float(), up, down)
    kernel_error = math.sqrt(residual / sq_norm) if sq_norm else 0.0
    # Triangle inequality: an upper bound on the error of the stored (cast) product.
    stored_error = (
        (math.sqrt(residual) + math.sqrt(rounding)) / math.sqrt(sq_norm) if sq_norm else 0.0
    )
    tensors = {
        task.outputs["up"]: up_out,
        task.outputs["down"]: down_out,
        task.outputs["alpha"]: torch.tensor(float(r), dtype=dtype),
    }
    return tensors, stored_error, kernel_error


def _stored_diff(task: ExtractTask, arrays: dict, dtype: torch.dtype):
    delta = torch.from_numpy(arrays["diff"])
    stored = cast(delta, dtype)
    norm = squared_norm(delta)
    rounding = squared_norm(delta - stored.float())
    error = math.sqrt(rounding / norm) if norm else 0.0
    return {task.outputs["diff"]: stored}, error, 0.0


BATCH_ENTRIES = 32
BATCH_BYTES = 256 * 2**20


def _batches(tasks: list[ExtractTask], markers: dict[str, dict]):
    """Groups of tasks read back together: at most 32 entries or 256 MiB of fp32 data."""
    batch, size = [], 0
    for task in tasks:
        shapes = markers[task.key].get("array_shapes", {}).values()
        nbytes = sum(4 * math.prod(shape) for shape in shapes)
        if batch and (len(batch) == BATCH_ENTRIES or size + nbytes > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(task)
        size += nbytes
    if batch:
        yield batch


def open_export(plan: ExtractionPlan, markers: dict[str, dict], output: str):
    """The output writer, laid out for the finished results (unchanged tensors have none)."""
    options: ExtractOptions = plan.options
    return open_output(
        output,
        options.output_format,
        planned_entries(plan, markers),
        options.max_shard_size,
        metadata={"format": "pt", "producer": "loraforge"},
    )


def export(
    plan: ExtractionPlan,
    markers: dict[str, dict],
    work: WorkDir,
    writer,
    recompute: Callable[[ExtractTask], dict],
) -> dict:
    """Write every finished result into ``writer`` (which the caller publishes); return, per
    key, (stored error, kernel error, note).

    An intermediate that cannot be read back intact is recomputed through ``recompute``, which
    runs the task where the run's tasks run (the session's workers or cluster, with their
    device), not in this process, and returns its new marker."""
    dtype = plan.options.torch_dtype
    errors: dict[str, tuple[float, float, str | None]] = {}
    stored = [t for t in plan.tasks if markers[t.key]["kind"] != "unchanged"]
    for batch in _batches(stored, markers):
        loaded = work.load_many([(task.key, markers[task.key]) for task in batch])
        for task in batch:
            marker, note = markers[task.key], None
            if isinstance(loaded[task.key], CorruptEntry):
                note = f"intermediate was unreadable ({loaded[task.key]}); recomputed"
                work.discard(task.key)
                marker = markers[task.key] = recompute(task)
                loaded[task.key] = work.load(task.key, marker)
            arrays, attributes = loaded.pop(task.key)
            if marker["kind"] == "lowrank":
                tensors, error, kernel_error = _stored_lowrank(
                    task, arrays, attributes, marker, dtype
                )
            else:
                tensors, error, kernel_error = _stored_diff(task, arrays, dtype)
            for name, tensor in tensors.items():
                writer.write(name, tensor)
            errors[task.key] = (error, kernel_error, note)
            maybe_crash("write", len(errors))
    return errors
