"""The write stage of every command that writes a LoRA from factored results kept in its work
directory (``extract``, ``resize``): each low-rank result's spectrum, the ranks a ``RankRule``
chooses from those spectra, the output layout at those ranks, then the cast tensors with the
error of what is stored.

Ranks are decided here, from stored numbers only (singular values on the up array's zarr
attributes, ‖Δ‖² and the residual in the marker), so another rank mode, budget or a rank below
the factored one is a re-export without recomputation. Runs where the output is (the client),
one batch of results in memory at a time. A task is anything with ``key``, ``shape`` and
``outputs`` (role → output key: up, down, alpha or diff)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from loraforge.kernels import (
    RankRule,
    Spectrum,
    kept_energy,
    product_distance_sq,
    squared_norm,
    truncated_residual_sq,
)
from loraforge.stages.cast import cast

from ..errors import UsageError
from ..io import safetensors_format as stf
from ..io.layout import OutputEntry
from ..io.slots import RowWriter
from ..run.faults import maybe_crash
from ..workdir import CorruptEntry, WorkDir
from .rank_options import ranked_outputs, with_cap
from .styles import KeyStyle
from .writer import config_file, open_lora_output, task_weights

METADATA = {"format": "pt", "producer": "loraforge"}


@dataclass
class RankedOutput:
    """One output file (or shard set) of a run: its cap, writer and chosen rank per tensor;
    ``errors`` fills in as it is written: key → (stored error, kernel error)."""

    cap: int
    writer: object
    ranks: dict[str, int]
    spectra: dict[str, Spectrum]
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def lowrank_params(self) -> int:
        """Parameters in the low-rank factors: Σ rank · (out + in)."""
        return sum(r * self.spectra[k].params_per_rank for k, r in self.ranks.items())

    def kept_energy(self, key: str) -> float:
        return kept_energy(self.spectra[key], self.ranks[key])


def written_beside(output: str, caps: Sequence[int], style: KeyStyle) -> list[str]:
    """Every file a run writes beside ``output`` (checked against the inputs before it
    starts): the other caps' outputs (``--rank 16,32``) and PEFT configs."""
    files = []
    for path in ranked_outputs(output, caps, style.directory).values():
        files += [f for f in (path, config_file(path, style)) if f]
    return [f for f in files if f != output]


def _recomputed(task, markers: dict, work: WorkDir, recompute, why) -> str:
    work.discard(task.key)
    markers[task.key] = recompute(task)
    return f"intermediate was unreadable ({why}); recomputed"


def lowrank_entry(key: str, outputs: Sequence[RankedOutput]) -> dict:
    """A low-rank tensor's report fields: rank, kept energy and errors in the largest cap's
    output, and with several caps every output's under ``ranks`` (keyed by the cap)."""
    per_cap = {
        str(output.cap): {
            "rank": output.ranks[key],
            "kept_energy": output.kept_energy(key),
            "rel_error": output.errors[key][0],
            "kernel_rel_error": output.errors[key][1],
        }
        for output in outputs
    }
    entry = dict(per_cap[str(outputs[-1].cap)])
    if len(outputs) > 1:
        entry["ranks"] = per_cap
    return entry


def outputs_summary(outputs: Sequence[RankedOutput]) -> list[dict]:
    """``summary.outputs``: per cap, its files and the parameters in its low-rank factors."""
    return [
        {"rank": o.cap, "files": o.writer.final_files, "lowrank_params": o.lowrank_params}
        for o in outputs
    ]


def singular_values(
    tasks: Sequence, markers: dict[str, dict], work: WorkDir, recompute: Callable
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Each low-rank result's stored singular values, and notes for results whose metadata did
    not read back and were recomputed first (``recompute(task)`` returns the new marker)."""
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


def spectrum(marker: dict, values: Sequence[float], cap: int, shape: tuple[int, ...]) -> Spectrum:
    """The spectrum of a stored result as factored to rank ``cap`` (a larger stored rank is
    sliced: the dropped components' energy joins the residual)."""
    k = min(cap, len(values))
    residual = truncated_residual_sq(float(marker["residual_sq"]), values, k)
    return Spectrum(values[:k], float(marker["sq_norm"]), residual, shape[0] + math.prod(shape[1:]))


def choose_ranks(rule: RankRule, spectra: dict[str, Spectrum]) -> dict[str, int]:
    """The rule's rank per key (budget mode decides over all of them at once)."""
    keys = list(spectra)
    try:
        chosen = rule.choose([spectra[k] for k in keys])
    except ValueError as e:
        raise UsageError(str(e)) from None
    return dict(zip(keys, chosen, strict=True))


def planned_entries(
    tasks: Sequence, markers: dict[str, dict], ranks: dict[str, int], code: str
) -> list[OutputEntry]:
    """The output's entries at the chosen ranks (unchanged tensors have none), sorted."""
    entries = []
    for task in tasks:
        kind = markers[task.key]["kind"]
        if kind == "lowrank":
            r = ranks[task.key]
            entries += [
                OutputEntry(task.outputs["up"], code, (task.shape[0], r)),
                OutputEntry(task.outputs["down"], code, (r, *task.shape[1:])),
            ]
            if "alpha" in task.outputs:  # styles that keep alpha in a config have no key
                entries.append(OutputEntry(task.outputs["alpha"], code, ()))
        elif kind == "diff":
            entries.append(OutputEntry(task.outputs["diff"], code, task.shape))
    return sorted(entries, key=lambda e: e.name)


def open_outputs(
    tasks: Sequence,
    markers: dict[str, dict],
    values: dict[str, list[float]],
    paths: dict[int, str],
    rule: RankRule,
    style: KeyStyle,
    dtype: torch.dtype,
    output_format: str,
    max_shard_size: int | None,
) -> list[RankedOutput]:
    """One writer per cap (``paths``: cap → output file), laid out at the ranks ``rule``
    (with that cap) chooses from the stored spectra, each truncated to the cap and to the
    task's own factored ``rank``. On failure the writers opened so far are aborted."""
    code = stf.CODE_BY_DTYPE[dtype]
    lowrank = [t for t in tasks if markers[t.key]["kind"] == "lowrank"]
    outputs: list[RankedOutput] = []
    try:
        for cap, path in paths.items():
            spectra = {
                t.key: spectrum(markers[t.key], values[t.key], min(cap, t.rank), t.shape)
                for t in lowrank
            }
            ranks = choose_ranks(with_cap(rule, cap), spectra)
            writer = open_lora_output(
                path,
                style,
                task_weights(tasks, markers, ranks),
                planned_entries(tasks, markers, ranks, code),
                output_format,
                max_shard_size,
                metadata=METADATA,
            )
            outputs.append(RankedOutput(cap, writer, ranks, spectra))
    except BaseException:
        abort(outputs)
        raise
    return outputs


def abort(outputs: Sequence[RankedOutput]) -> None:
    """Remove every output's temporaries: nothing at the outputs changed."""
    for output in outputs:
        output.writer.abort()


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
    rounding = product_distance_sq(up_out.float(), down_out.float(), up, down)
    kernel_error = math.sqrt(max(residual, 0.0) / sq_norm) if sq_norm else 0.0
    stored_error = (
        (math.sqrt(max(residual, 0.0)) + math.sqrt(rounding)) / math.sqrt(sq_norm)
        if sq_norm
        else 0.0
    )
    tensors = {
        task.outputs["up"]: up_out,
        task.outputs["down"]: down_out.reshape(rank, *task.shape[1:]),
    }
    if "alpha" in task.outputs:
        tensors[task.outputs["alpha"]] = torch.tensor(float(rank), dtype=dtype)
    return tensors, stored_error, kernel_error


def diff_tensors(task, arrays: dict, dtype: torch.dtype) -> tuple[dict, float, float]:
    delta = torch.from_numpy(arrays["diff"])
    stored = cast(delta, dtype)
    norm = squared_norm(delta)
    rounding = squared_norm(delta - stored.float())
    error = math.sqrt(rounding / norm) if norm else 0.0
    return {task.outputs["diff"]: stored}, error, 0.0


def _is_streamed(marker: dict) -> bool:
    """A diff that ran blocked (larger than the memory budget) is read back chunk by chunk."""
    return marker["kind"] == "diff" and bool(marker.get("blocked"))


def _write_streamed_diff(
    task, marker: dict, work: WorkDir, outputs: Sequence[RankedOutput], dtype: torch.dtype
) -> None:
    """``diff_tensors`` a stored chunk of rows at a time, written at its place in every
    output: the whole diff is never in memory."""
    name = task.outputs["diff"]
    norm = rounding = 0.0
    with ExitStack() as stack:
        rows = [stack.enter_context(RowWriter(output.writer.slot(name))) for output in outputs]
        for chunk in work.row_chunks(task.key, "diff", marker["array_shapes"]["diff"]):
            delta = torch.from_numpy(chunk)
            stored = cast(delta, dtype)
            norm += squared_norm(delta)
            rounding += squared_norm(delta - stored.float())
            for writer in rows:
                writer.write(stored)
        crcs = [writer.close() for writer in rows]
    error = math.sqrt(rounding / norm) if norm else 0.0
    for output, crc in zip(outputs, crcs, strict=True):
        output.writer.mark_written(name, crc)
        output.errors[task.key] = (error, 0.0)


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


def export(
    tasks: Sequence,
    markers: dict[str, dict],
    work: WorkDir,
    outputs: Sequence[RankedOutput],
    values: dict[str, list[float]],
    dtype: torch.dtype,
    recompute: Callable,
) -> dict[str, str]:
    """Write every finished result into each output's writer (which the caller publishes);
    each output's ``errors`` fills in. Returns notes for results recomputed on the way.

    An intermediate that cannot be read back intact is recomputed through ``recompute``, which
    runs the task where the run's tasks run (the session's workers or cluster, with their
    device), not in this process, and returns its new marker; factors are deterministic (the
    same seed, device and kernel), so the ranks chosen from the old spectrum still apply."""
    notes: dict[str, str] = {}
    stored = [t for t in tasks if markers[t.key]["kind"] != "unchanged"]
    streamed = [t for t in stored if _is_streamed(markers[t.key])]
    for task in streamed:
        try:
            _write_streamed_diff(task, markers[task.key], work, outputs, dtype)
        except CorruptEntry as e:
            notes[task.key] = _recomputed(task, markers, work, recompute, e)
            _write_streamed_diff(task, markers[task.key], work, outputs, dtype)
    stored = [t for t in stored if not _is_streamed(markers[t.key])]
    written = len(streamed)
    for batch in _batches(stored, markers):
        loaded = work.load_many([(task.key, markers[task.key]) for task in batch])
        for task in batch:
            if isinstance(loaded[task.key], CorruptEntry):
                notes[task.key] = _recomputed(task, markers, work, recompute, loaded[task.key])
                loaded[task.key] = work.load(task.key, markers[task.key])
                if markers[task.key]["kind"] == "lowrank":  # now factored at the task's rank
                    values[task.key] = list(loaded[task.key][1]["up"]["singular_values"])
            arrays, _attributes = loaded.pop(task.key)
            marker = markers[task.key]
            same = diff_tensors(task, arrays, dtype) if marker["kind"] == "diff" else None
            for output in outputs:
                tensors, error, kernel_error = same or lowrank_tensors(
                    task, arrays, marker, values[task.key], output.ranks[task.key], dtype
                )
                for name, tensor in tensors.items():
                    output.writer.write(name, tensor)
                output.errors[task.key] = (error, kernel_error)
            written += 1
            maybe_crash("write", written)
    return notes
