"""The outputs of a LoRA-writing run (``extract``, ``resize``) laid out at the ranks chosen from
the stored spectra: one per ``--rank`` cap, each with its writer, its chosen rank per tensor
and, once written, the errors of what it stores.

Ranks are decided here, from stored numbers only (singular values on the up array's zarr
attributes, ‖Δ‖² and the residual in the marker), so another rank mode, budget or a rank below
the factored one is a re-export without recomputation. A task is anything with ``key``,
``shape``, ``rank`` and ``outputs`` (role → output key: up, down, alpha or diff)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from loraforge.kernels import RankRule, Spectrum, kept_energy, truncated_residual_sq

from ..errors import UsageError
from ..io import safetensors_format as stf
from ..io.layout import OutputEntry
from ..io.writer import PRODUCER
from ..lora.styles import KeyStyle, diff_pair
from ..run.session import Session
from .options import LoraOutput
from .ranks import with_cap
from .writer import open_lora_output, task_weights


@dataclass
class RankedOutput:
    """One output file (or shard set) of a run: its cap, writer, chosen rank per tensor and
    the entries laid out at those ranks; ``errors`` fills in as it is written: key → (stored
    error, kernel error)."""

    cap: int
    writer: object
    ranks: dict[str, int]
    spectra: dict[str, Spectrum]
    entries: list[OutputEntry]
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def lowrank_params(self) -> int:
        """Parameters in the low-rank factors: Σ rank · (out + in)."""
        return sum(r * self.spectra[k].params_per_rank for k, r in self.ranks.items())

    def kept_energy(self, key: str) -> float:
        return kept_energy(self.spectra[key], self.ranks[key])


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


def factor_shapes(shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Up's and down's shapes for a weight of ``shape`` at ``rank``: a conv weight's up is
    ``(out, rank, 1, ...)``, with as many dims as down (kohya's, LyCORIS's and PEFT's
    convention: its 1×1 conv), a matrix's ``(out, rank)``."""
    return (shape[0], rank, *(1,) * (len(shape) - 2)), (rank, *shape[1:])


def planned_entries(
    tasks: Sequence, markers: dict[str, dict], ranks: dict[str, int], code: str
) -> list[OutputEntry]:
    """The output's entries at the chosen ranks (unchanged tensors have none), sorted."""
    entries = []
    for task in tasks:
        kind = markers[task.key]["kind"]
        if kind == "lowrank":
            r = ranks[task.key]
            up, down = factor_shapes(task.shape, r)
            entries += [
                OutputEntry(task.outputs["up"], code, up),
                OutputEntry(task.outputs["down"], code, down),
            ]
            if "alpha" in task.outputs:  # fp32 whatever the factors' dtype: exact for any rank
                entries.append(OutputEntry(task.outputs["alpha"], "F32", ()))
        elif kind == "diff" and "diff" in task.outputs:
            entries.append(OutputEntry(task.outputs["diff"], code, task.shape))
        elif kind == "diff":  # a 2-D diff written as an exact pair (styles.diff_pair)
            r = diff_pair(task.shape).rank
            entries += [
                OutputEntry(task.outputs["up"], code, (task.shape[0], r)),
                OutputEntry(task.outputs["down"], code, (r, task.shape[1])),
            ]
            if "alpha" in task.outputs:
                entries.append(OutputEntry(task.outputs["alpha"], "F32", ()))
    return sorted(entries, key=lambda e: e.name)


def open_outputs(
    tasks: Sequence,
    markers: dict[str, dict],
    values: dict[str, list[float]],
    options: LoraOutput,
    style: KeyStyle,
    session: Session,
) -> list[RankedOutput]:
    """One writer per cap (``options.paths`` of the session's output), laid out at the ranks
    the rule (with that cap) chooses from the stored spectra, each truncated to the cap and to
    the task's own factored ``rank``; each writer is the session's, published or aborted with
    the run."""
    code = stf.CODE_BY_DTYPE[options.torch_dtype]
    lowrank = [t for t in tasks if markers[t.key]["kind"] == "lowrank"]
    outputs: list[RankedOutput] = []
    for cap, path in options.paths(session.output).items():
        spectra = {
            t.key: spectrum(markers[t.key], values[t.key], min(cap, t.rank), t.shape)
            for t in lowrank
        }
        ranks = choose_ranks(with_cap(options.rank_rule, cap), spectra)
        entries = planned_entries(tasks, markers, ranks, code)
        writer = open_lora_output(
            path,
            style,
            task_weights(tasks, markers, ranks),
            entries,
            options.output_format,
            options.max_shard_size,
            metadata=PRODUCER,
        )
        outputs.append(RankedOutput(cap, session.add_writer(writer), ranks, spectra, entries))
    return outputs
