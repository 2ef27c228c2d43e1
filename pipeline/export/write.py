"""The write stage of every command that writes a LoRA from factored results kept in its work
directory (``extract``, ``resize``): each low-rank result's stored spectrum, the outputs laid out
at the ranks chosen from it (``outputs.py``), then every result cast and written with the error
of what is stored. Runs where the output is (the client), one batch of results in memory at a
time."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from loraforge.kernels import rounding_distance_sq, squared_norm, truncated_residual_sq
from loraforge.stages.cast import cast

from ..io.finite import check_written, is_finite, output_fix
from ..io.slots import RowWriter
from ..lora.styles import diff_pair
from ..run.faults import maybe_crash
from ..run.session import Recompute, Session
from ..workdir import CorruptEntry, WorkDir
from .clients import ClientVerdicts, judge
from .outputs import RankedOutput, factor_shapes, open_outputs


@dataclass
class Exported:
    outputs: list[RankedOutput]  # one per cap, ascending
    notes: dict[str, str]  # per tensor whose intermediate did not read back: recomputed, why
    clients: ClientVerdicts | None = None  # what the style's loaders apply of the largest file

    def report_clients(self, plan, tensors: dict[str, dict]) -> dict | None:
        """The report's ``summary.clients`` (None: a model no client rules judge); each tensor
        a client leaves out gets ``not_applied_by`` (client → why) in ``tensors``."""
        if self.clients is None:
            return None
        return self.clients.report(plan.tasks, plan.style, tensors)


def export_loras(
    plan,
    markers: dict[str, dict],
    session: Session,
    recompute: Recompute,
    *,
    checked: bool = True,
) -> Exported:
    """Write every finished result of ``plan.tasks`` (their ``markers``, in the session's work
    directory) into one output per cap of ``plan.options`` (a ``LoraOutput``) at the session's
    output, named in ``plan.style`` (the options' style for this model): the writers are the
    session's, published with the report. An intermediate that cannot be read back intact is
    run again through ``recompute`` (where the run's tasks run, not in this process); factors
    are deterministic (the same seed, device and kernel), so ranks chosen from the old spectrum
    still apply. Every tensor is checked finite as cast unless not ``checked`` (resize's
    ``--allow-nonfinite``)."""
    tasks, options, work = plan.tasks, plan.options, session.work
    values, notes = _singular_values(tasks, markers, work, recompute)
    outputs = open_outputs(tasks, markers, values, options, plan.style, session)
    dtype = options.torch_dtype
    clients = judge(plan.style, outputs[-1].entries)
    for warning in clients.warnings() if clients else ():
        session.emit("warning", {"message": warning})
    notes.update(_write(tasks, markers, work, outputs, values, dtype, recompute, checked))
    return Exported(outputs, notes, clients)


def _check(task, tensors: dict, dtype: torch.dtype) -> None:
    """Every tensor about to be written for ``task`` finite (``io/finite.py``), else one line
    naming it, what it was made from (``task.made_from``) and how to avoid it."""
    for name, tensor in tensors.items():
        if not is_finite(tensor):  # the message is built only for a tensor that fails
            fix = output_fix(dtype, task.knob)
            check_written(tensor, key=name, made_from=task.made_from, fix=fix, dtype=dtype)


def _recomputed(task, markers: dict, work: WorkDir, recompute: Recompute, why) -> str:
    work.discard(task.key)
    markers[task.key] = recompute(task.key)
    return f"intermediate was unreadable ({why}); recomputed"


def _singular_values(
    tasks: Sequence, markers: dict[str, dict], work: WorkDir, recompute: Recompute
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Each low-rank result's stored singular values, and notes for results whose metadata did
    not read back and were recomputed first."""
    values, notes = {}, {}
    for task in tasks:
        if markers[task.key]["kind"] != "lowrank":
            continue
        try:
            values[task.key] = list(work.attributes(task.key, "up")["singular_values"])
        except (CorruptEntry, KeyError) as why:
            notes[task.key] = _recomputed(task, markers, work, recompute, why)
            values[task.key] = list(work.attributes(task.key, "up")["singular_values"])
    return values, notes


def lowrank_tensors(
    task, arrays: dict, marker: dict, values: Sequence[float], rank: int, dtype: torch.dtype
) -> tuple[dict, float, float]:
    """The rank-``rank`` factors cast to ``dtype`` with alpha = rank (scale 1), the relative
    error of the stored product (kernel residual plus cast rounding, by the triangle
    inequality: an upper bound) and the kernel's own relative error at that rank."""
    up = torch.from_numpy(arrays["up"][:, :rank])
    down = torch.from_numpy(arrays["down"][:rank])
    up_out, down_out = cast(up, dtype), cast(down, dtype)
    sq_norm = float(marker["sq_norm"])
    residual = truncated_residual_sq(float(marker["residual_sq"]), values, rank)
    rounding = rounding_distance_sq(up, down, up_out, down_out)
    kernel_error = math.sqrt(max(residual, 0.0) / sq_norm) if sq_norm else 0.0
    stored_error = (
        (math.sqrt(max(residual, 0.0)) + math.sqrt(rounding)) / math.sqrt(sq_norm)
        if sq_norm
        else 0.0
    )
    up_shape, down_shape = factor_shapes(task.shape, rank)
    tensors = {
        task.outputs["up"]: up_out.reshape(up_shape),
        task.outputs["down"]: down_out.reshape(down_shape),
    }
    if "alpha" in task.outputs:  # fp32 whatever the factors' dtype: exact for any rank
        tensors[task.outputs["alpha"]] = torch.tensor(float(rank), dtype=torch.float32)
    return tensors, stored_error, kernel_error


def _diff_holder(task) -> str:
    """The output role a stored diff's values go to: ``diff``, or the factor of the exact pair
    that holds them (``styles.diff_pair``)."""
    return "diff" if "diff" in task.outputs else diff_pair(task.shape).holder


def _identity(task, dtype: torch.dtype) -> dict:
    """The identity factor of a diff written as an exact pair, and its alpha (= rank) where
    the style keeps one as a key (none for a ``.diff``)."""
    if "diff" in task.outputs:
        return {}
    pair = diff_pair(task.shape)
    tensors = {task.outputs[pair.identity]: torch.eye(pair.rank, dtype=dtype)}
    if "alpha" in task.outputs:
        tensors[task.outputs["alpha"]] = torch.tensor(float(pair.rank), dtype=torch.float32)
    return tensors


def diff_tensors(task, arrays: dict, dtype: torch.dtype) -> tuple[dict, float, float]:
    delta = torch.from_numpy(arrays["diff"])
    stored = cast(delta, dtype)
    norm = squared_norm(delta)
    rounding = squared_norm(delta - stored.float())
    error = math.sqrt(rounding / norm) if norm else 0.0
    return {task.outputs[_diff_holder(task)]: stored, **_identity(task, dtype)}, error, 0.0


def _is_streamed(marker: dict) -> bool:
    """A diff that ran blocked (larger than the memory budget) is read back chunk by chunk."""
    return marker["kind"] == "diff" and bool(marker.get("blocked"))


def _write_streamed_diff(
    task,
    marker: dict,
    work: WorkDir,
    outputs: Sequence[RankedOutput],
    dtype: torch.dtype,
    checked: bool,
) -> None:
    """``diff_tensors`` a stored chunk of rows at a time, written at its place in every
    output: the whole diff is never in memory."""
    name = task.outputs[_diff_holder(task)]
    norm = rounding = 0.0
    with ExitStack() as stack:
        rows = [stack.enter_context(RowWriter(output.writer.slot(name))) for output in outputs]
        for chunk in work.row_chunks(task.key, "diff", marker["array_shapes"]["diff"]):
            delta = torch.from_numpy(chunk)
            stored = cast(delta, dtype)
            if checked:
                _check(task, {name: stored}, dtype)
            norm += squared_norm(delta)
            rounding += squared_norm(delta - stored.float())
            for writer in rows:
                writer.write(stored)
        crcs = [writer.close() for writer in rows]
    error = math.sqrt(rounding / norm) if norm else 0.0
    for output, crc in zip(outputs, crcs, strict=True):
        output.writer.mark_written(name, crc)
        output.errors[task.key] = (error, 0.0)
        for other, identity in _identity(task, dtype).items():
            output.writer.write(other, identity)


BATCH_ENTRIES = 32
BATCH_BYTES = 256 * 2**20


def _batches(tasks: Sequence, markers: dict[str, dict]):
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


def _loaded(batches: Iterator[list], markers: dict[str, dict], work: WorkDir) -> Iterator:
    """Each batch with its entries loaded (``WorkDir.load_many``), the next batch loading in a
    thread while the caller casts and writes this one (file reads and CRC-32Cs release the
    GIL: 0.2 s of a Wan-1.3B export's 0.6 s write stage overlap)."""
    with ThreadPoolExecutor(1) as pool:
        previous = None
        for batch in batches:
            future = pool.submit(work.load_many, [(task.key, markers[task.key]) for task in batch])
            if previous is not None:
                yield previous[0], previous[1].result()
            previous = batch, future
        if previous is not None:
            yield previous[0], previous[1].result()


def _write(
    tasks: Sequence,
    markers: dict[str, dict],
    work: WorkDir,
    outputs: Sequence[RankedOutput],
    values: dict[str, list[float]],
    dtype: torch.dtype,
    recompute: Recompute,
    checked: bool = True,
) -> dict[str, str]:
    """Every finished result into each output's writer, each tensor checked finite as cast
    (unless not ``checked``); each output's ``errors`` fills in. Returns notes for results
    recomputed on the way."""
    notes: dict[str, str] = {}
    stored = [t for t in tasks if markers[t.key]["kind"] != "unchanged"]
    streamed = [t for t in stored if _is_streamed(markers[t.key])]
    for task in streamed:
        try:
            _write_streamed_diff(task, markers[task.key], work, outputs, dtype, checked)
        except CorruptEntry as e:
            notes[task.key] = _recomputed(task, markers, work, recompute, e)
            _write_streamed_diff(task, markers[task.key], work, outputs, dtype, checked)
    stored = [t for t in stored if not _is_streamed(markers[t.key])]
    written = len(streamed)
    for batch, loaded in _loaded(_batches(stored, markers), markers, work):
        for task in batch:
            if isinstance(loaded[task.key], CorruptEntry):
                notes[task.key] = _recomputed(task, markers, work, recompute, loaded[task.key])
                loaded[task.key] = work.load(task.key, markers[task.key])
                if markers[task.key]["kind"] == "lowrank":  # now factored at the task's rank
                    values[task.key] = list(loaded[task.key][1]["up"]["singular_values"])
            arrays, _attributes = loaded.pop(task.key)
            marker = markers[task.key]
            same = diff_tensors(task, arrays, dtype) if marker["kind"] == "diff" else None
            if checked and same:  # a diff is the same in every output: checked once
                _check(task, same[0], dtype)
            for output in outputs:
                tensors, error, kernel_error = same or lowrank_tensors(
                    task, arrays, marker, values[task.key], output.ranks[task.key], dtype
                )
                if checked and not same:
                    _check(task, tensors, dtype)
                for name, tensor in tensors.items():
                    output.writer.write(name, tensor)
                output.errors[task.key] = (error, kernel_error)
            written += 1
            maybe_crash("write", written)
    return notes
