"""The output's layout, decided before any tensor is computed: file names (LightX2V's suffix
rule, Hugging Face shards and index), and each planned tensor's entry and slot."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from . import safetensors_format as stf

SUFFIXES = {"safetensors": (".safetensors",), "pytorch": (".pt", ".pth"), "mp4": (".mp4",)}


def output_path(output: str, output_format: str) -> str:
    """LightX2V's rule: add ``.safetensors``/``.pt``/``.mp4`` when the name lacks a matching
    suffix."""
    output = os.path.abspath(os.path.expanduser(output))
    if not output.endswith(SUFFIXES[output_format]):
        output += SUFFIXES[output_format][0]
    return output


@dataclass(frozen=True)
class OutputEntry:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return stf.nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class Slot:
    """Where one planned tensor's bytes go: a temporary output file and an absolute offset.
    Plain data, so a task in any process can write its own tensor (``writer.write_at``)."""

    file: str
    offset: int
    entry: OutputEntry
    zip_crc: bool = False  # a zip record needs its CRC-32 (torch.save's format), else CRC-32C


def split_shards(
    entries: list[tuple[str, int]],
    max_shard_size: int | None,
    groups: Mapping[str, str] | None = None,
) -> list[list[str]]:
    """Greedy split in the given order: a shard is closed when the next tensor would push it past
    ``max_shard_size``; a tensor larger than the limit gets a shard of its own.

    ``groups`` maps entry names to a group (a LoRA weight: its up, down and alpha), whose
    entries must land in one shard: a shard is then only closed where no group has entries on
    both sides, and a run of entries that cannot be cut larger than the limit is a shard of its
    own. The order is never changed."""
    if not max_shard_size:
        return [[name for name, _ in entries]]
    shards: list[list[str]] = [[]]
    size = 0
    for block in _uncut_runs(entries, groups or {}):
        nbytes = sum(n for _, n in block)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].extend(name for name, _ in block)
        size += nbytes
    return shards


def _uncut_runs(
    entries: list[tuple[str, int]], groups: Mapping[str, str]
) -> list[list[tuple[str, int]]]:
    """``entries`` in runs that hold each group whole: a run ends only after the last entry of
    every group it has started. Without groups, each entry is its own run."""
    last = {groups[name]: i for i, (name, _) in enumerate(entries) if name in groups}
    runs: list[list[tuple[str, int]]] = []
    open_until = -1
    for i, entry in enumerate(entries):
        if i > open_until:
            runs.append([])
        runs[-1].append(entry)
        open_until = max(open_until, last.get(groups.get(entry[0]), i))
    return runs


def shard_file_names(output: str, count: int) -> list[str]:
    """``x.safetensors`` → ``x-00001-of-00003.safetensors`` …; one shard keeps ``output``."""
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)]


def index_file_name(output: str) -> str:
    return output + ".index.json"


def output_files(
    output: str,
    entries: list[OutputEntry],
    max_shard_size: int | None,
    groups: Mapping[str, str] | None = None,
) -> list[str]:
    """Every file the output will consist of: its shards, and the index when there are several."""
    count = len(split_shards([(e.name, e.nbytes) for e in entries], max_shard_size, groups))
    files = shard_file_names(output, count)
    return [*files, index_file_name(output)] if count > 1 else files


def shard_pattern(output: str) -> re.Pattern:
    """Names of the shards ``output`` may be split into (``<stem>-00001-of-00003<ext>``)."""
    stem, ext = os.path.splitext(os.path.basename(output))
    return re.compile(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}{re.escape(ext)}")


def output_candidates(output: str) -> list[str]:
    """Every file an output at ``output`` may consist of that exists already or is named by
    the output itself: the file, its index, and existing files named like its shards."""
    directory = os.path.dirname(output)
    pattern = shard_pattern(output)
    try:
        names = os.listdir(directory)
    except OSError:
        names = []
    shards = [os.path.join(directory, n) for n in sorted(names) if pattern.fullmatch(n)]
    return [output, index_file_name(output), *shards]
