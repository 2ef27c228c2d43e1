"""Extraction planning from headers alone: one task per tensor, decided before any data is read.

The plan is plain data (dataclasses of strings, ints and tuples): the executor consumes it and
never discovers work on its own, so resume, progress totals and ``--dry-run`` share it."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..io.reader import CheckpointIndex, TensorInfo
from ..lora.styles import KeyStyle
from .options import ExtractOptions


@dataclass(frozen=True)
class ExtractTask:
    key: str
    kind: str  # "lowrank" | "diff"; the task itself may find the tensor unchanged
    shape: tuple[int, ...]
    rank: int  # effective rank (0 for diffs)
    source: TensorInfo
    target: TensorInfo
    outputs: dict[str, str]  # role ("up", "down", "alpha", "diff") -> output key
    note: str | None = None

    @property
    def name(self) -> str:
        """Readable, stable Dask key."""
        return f"{self.kind}-{self.key}"

    @property
    def read_bytes(self) -> int:
        return self.source.nbytes + self.target.nbytes

    @property
    def made_from(self) -> str:
        """What its output tensors are made from, for messages (``export/write.py``)."""
        return f"{self.target.file} − {self.source.file}"

    knob = None  # no option scales an extracted delta (``io/finite.output_fix``)


@dataclass(frozen=True)
class Skipped:
    key: str
    reason: str


@dataclass(frozen=True)
class ExtractionPlan:
    options: ExtractOptions
    style: KeyStyle  # the options' key style for this model (``KeyStyle.for_model``)
    tasks: list[ExtractTask]
    skipped: list[Skipped] = field(default_factory=list)
    source_only: list[str] = field(default_factory=list)
    target_only: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)


def plan_extraction(
    source: CheckpointIndex, target: CheckpointIndex, options: ExtractOptions
) -> ExtractionPlan:
    tasks: list[ExtractTask] = []
    style = options.style.for_model(source.tensors)
    # Scaled-fp8 bookkeeping (scales, markers) is read with its weight, never diffed itself.
    companions = {**target.fp8.companions, **source.fp8.companions}
    skipped = [Skipped(k, companions[k]) for k in sorted(companions)]
    for key in sorted((set(source.tensors) & set(target.tensors)) - set(companions)):
        src, tgt = source.tensors[key], target.tensors[key]
        if src.shape != tgt.shape:
            skipped.append(Skipped(key, f"shape mismatch: {list(src.shape)} vs {list(tgt.shape)}"))
            continue
        if not (src.is_float and tgt.is_float):
            skipped.append(Skipped(key, f"not a float tensor ({src.dtype}/{tgt.dtype})"))
            continue
        task = _plan_tensor(key, src, tgt, options, style)
        if isinstance(task, Skipped):
            skipped.append(task)
        else:
            tasks.append(task)
    return ExtractionPlan(
        options=options,
        style=style,
        tasks=tasks,
        skipped=skipped,
        source_only=sorted(set(source.tensors) - set(target.tensors) - set(companions)),
        target_only=sorted(set(target.tensors) - set(source.tensors) - set(companions)),
    )


def _plan_tensor(
    key: str, src: TensorInfo, tgt: TensorInfo, options: ExtractOptions, style: KeyStyle
) -> ExtractTask | Skipped:
    shape = src.shape
    large = src.numel >= options.lowrank_min_params and len(shape) > 1
    if not options.diff_only and large and len(shape) == 2 and key.endswith(".weight"):
        rank = min(options.kernel.rank, *shape)
        return ExtractTask(key, "lowrank", shape, rank, src, tgt, style.lowrank_names(key))
    outputs = style.diff_outputs(key, shape, keep_diff=options.diff_only)
    if outputs is None:
        return Skipped(key, style.cannot_hold(key))
    note = None
    if large and not options.diff_only:
        note = (
            f"{len(shape)}-D tensor stored as a full diff (LightX2V's extractor fails here)"
            if len(shape) != 2
            else "large tensor without .weight suffix stored as a diff"
        )
    return ExtractTask(key, "diff", shape, 0, src, tgt, outputs, note)
