"""Output shard layout (Hugging Face's): a pure function over (name, nbytes) pairs."""

from __future__ import annotations

import os


def split_shards(entries: list[tuple[str, int]], max_shard_size: int | None) -> list[list[str]]:
    """Greedy split in the given order: a shard is closed when the next tensor would push it past
    ``max_shard_size``; a tensor larger than the limit gets a shard of its own."""
    if not max_shard_size:
        return [[name for name, _ in entries]]
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in entries:
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_names(output: str, count: int) -> list[str]:
    """``x.safetensors`` → ``x-00001-of-00003.safetensors`` …; one shard keeps ``output``."""
    if count == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    return [f"{stem}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)]


def index_file_name(output: str) -> str:
    return output + ".index.json"
