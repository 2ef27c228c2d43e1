"""The one writer of LoRAs (``extract``, ``convert``, ``resize``): planned entries, already named
by a key style (``styles.py``), into the output through ``io.writer.open_output``.

It adds what a LoRA needs beyond a checkpoint: a weight's entries (up, down, alpha) are never
split across shards; a diffusers file carries its LoRA config in the header; a PEFT adapter is
a directory whose ``adapter_config.json`` is written under a temporary name and renamed right
after the weights (``Session.publish``): a crash between the two renames, and only then, leaves
the new weights beside the directory's previous config."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..io.atomic import remove_quietly, temporary_name, write_json_to
from ..io.layout import OutputEntry
from ..io.writer import open_output
from ..lora.adapter_config import METADATA_KEY, build_config, diffusers_metadata
from ..lora.inputs import PEFT_CONFIG
from ..lora.styles import KeyStyle, check_output, diff_pair, module_of
from ..run.options import RunOptions

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what PeftModel.from_pretrained reads first


@dataclass(frozen=True)
class LoraWeight:
    """One patched checkpoint tensor as written: its entries' names, and for a low-rank pair
    its rank and alpha (scale = alpha / rank)."""

    key: str  # the checkpoint tensor it patches (``<module>.weight`` for a low-rank pair)
    names: tuple[str, ...]
    rank: int | None = None
    alpha: float | None = None


def task_weights(
    tasks: Sequence, markers: dict[str, dict], ranks: dict[str, int]
) -> list[LoraWeight]:
    """The written weights of a command's tasks (anything with ``key``, ``shape`` and
    ``outputs``, role → output key) at the chosen ranks, alpha = rank (a diff written as a pair:
    its pair's rank); unchanged tensors have none."""
    weights = []
    for task in tasks:
        kind = markers[task.key]["kind"]
        if kind == "lowrank":
            rank = ranks[task.key]
        elif kind == "diff":
            rank = None if "diff" in task.outputs else diff_pair(task.shape)[0]
        else:
            continue
        weights.append(LoraWeight(task.key, tuple(task.outputs.values()), rank, rank))
    return weights


def weights_file(output: str, style: KeyStyle) -> str:
    """The weights file of ``output``: itself, or ``<dir>/adapter_model.safetensors`` for a
    PEFT directory (``--output`` names the directory)."""
    if not style.directory:
        return output
    return os.path.join(os.path.abspath(os.path.expanduser(output.rstrip("/\\"))), ADAPTER_WEIGHTS)


def lora_location(run: RunOptions, output: str, style: KeyStyle) -> tuple[RunOptions, str]:
    """The run options and weights file of a LoRA written at ``output`` (``weights_file``).
    For a PEFT directory the report and work directory default to ``<dir>.report.json`` and
    ``<dir>.work`` beside it, so the adapter directory holds only the adapter."""
    weights = weights_file(output, style)
    if not style.directory:
        return run, weights
    folder = os.path.dirname(weights)
    run = dataclasses.replace(
        run,
        report=run.report or folder + ".report.json",
        work_dir=run.work_dir or folder + ".work",
    )
    return run, weights


def config_file(weights: str, style: KeyStyle) -> str | None:
    """The ``adapter_config.json`` written beside ``weights`` (PEFT only)."""
    return os.path.join(os.path.dirname(weights), PEFT_CONFIG) if style.directory else None


class PeftDirectory:
    """A PEFT adapter directory: the weights' writer plus ``adapter_config.json``, sealed and
    published together (config renamed right after the weights)."""

    def __init__(self, weights, config_path: str, config: dict):
        self._weights = weights
        self._config_path = config_path
        self._config = config
        self._pending: str | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._weights.write(name, tensor)

    @property
    def final_files(self) -> list[str]:
        return [*self._weights.final_files, self._config_path]

    @property
    def temporaries(self) -> list[str]:
        return [*self._weights.temporaries, *([self._pending] if self._pending else [])]

    def seal(self) -> None:
        self._weights.seal()
        self._pending = temporary_name(self._config_path)
        write_json_to(self._pending, self._config)

    def publish(self) -> list[str]:
        self._weights.publish()
        os.replace(self._pending, self._config_path)
        self._pending = None
        return self.final_files

    def close(self) -> None:
        self._weights.close()

    def abort(self) -> None:
        self._weights.abort()
        if self._pending:
            remove_quietly(self._pending)
            self._pending = None


def open_lora_output(
    output: str,
    style: KeyStyle,
    weights: Sequence[LoraWeight],
    entries: list[OutputEntry],
    output_format: str = "safetensors",
    max_shard_size: int | None = None,
    metadata: dict[str, str] | None = None,
):
    """The writer of a LoRA at ``output`` (for PEFT, ``weights_file(...)``) holding
    ``entries``, each named in exactly one of ``weights``. Writes by entry name; seal, publish
    and abort as ``io.writer``'s outputs."""
    check_output(style, output_format, max_shard_size)
    groups = {name: weight.key for weight in weights for name in weight.names}
    missing = sorted({e.name for e in entries} - set(groups))
    if missing:
        raise ValueError(f"entries of no planned weight: {', '.join(missing[:5])}")
    modules = [
        (style.relaid(module_of(w.key)), w.rank, float(w.rank if w.alpha is None else w.alpha))
        for w in weights
        if w.rank is not None
    ]
    metadata = dict(metadata or {})
    if style.alpha_in == "metadata":
        metadata[METADATA_KEY] = diffusers_metadata(build_config(modules))
    writer = open_output(output, output_format, entries, max_shard_size, metadata, groups=groups)
    if style.directory:
        return PeftDirectory(writer, config_file(output, style), build_config(modules))
    return writer
