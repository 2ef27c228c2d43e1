"""The rank flags every command that writes a LoRA shares (``extract``, ``resize``): ``--rank``
as one cap or a list of caps (one output file each), and the ``--rank-mode`` rule built from
the flags with usage errors (exit code 2) instead of the kernel's ``ValueError``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from loraforge.kernels import RankRule

from ..errors import UsageError


def parse_ranks(text: str) -> tuple[int, ...]:
    """``"32"`` → ``(32,)``; ``"64,16,32"`` → ``(16, 32, 64)``: each cap once, ascending."""
    values = []
    for part in str(text).split(","):
        try:
            value = int(part.strip())
        except ValueError:
            raise UsageError(
                f"--rank {text!r} is not an integer or a comma-separated list of integers"
            ) from None
        if value < 1:
            raise UsageError(f"--rank must be >= 1, got {value}")
        values.append(value)
    return tuple(sorted(set(values)))


def parse_iterations(text: str) -> int | None:
    """``--power-iterations``: ``auto`` (None: adaptive) or a count >= 0."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--power-iterations {text!r} is not 'auto' or an integer") from None
    if value < 0:
        raise UsageError("--oversample and --power-iterations must be >= 0")
    return value


def rank_rule(**fields) -> RankRule:
    """``RankRule(**fields)``, its validation errors as one-line usage errors."""
    try:
        return RankRule(**fields)
    except ValueError as e:
        raise UsageError(str(e)) from None


def rule_from(value: RankRule | dict | None, rank: int) -> RankRule:
    """An options object's rule: a ``RankRule``, its dict (``from_dict``), or None for the
    default (fixed at ``rank``). Its cap must be ``rank``."""
    if isinstance(value, dict):
        value = rank_rule(**value)
    rule = value if value is not None else rank_rule(rank=rank)
    if rule.rank != rank:
        raise UsageError(f"the rank rule's cap {rule.rank} differs from --rank {rank}")
    return rule


def checked_ranks(ranks: Sequence[int], rule: RankRule, cap: str) -> tuple[int, ...]:
    """An options object's caps, one output each (``()``: the rule's rank alone): ascending to
    the rule's rank (``cap`` names it in the error), none below its ``--min-rank``."""
    ranks = tuple(ranks) or (rule.rank,)
    if list(ranks) != sorted(set(ranks)) or ranks[-1] != rule.rank:
        raise UsageError(f"ranks {list(ranks)} must ascend to the {cap}")
    if ranks[0] < rule.min_rank:
        raise UsageError(f"--min-rank {rule.min_rank} is above --rank {ranks[0]}")
    return ranks


def with_cap(rule: RankRule, cap: int) -> RankRule:
    """The rule for one output of a ``--rank 16,32,64`` run: same mode, cap ``cap``."""
    return rank_rule(**{**dataclasses.asdict(rule), "rank": cap})


def ranked_output(output: str, cap: int) -> str:
    """``out.safetensors`` → ``out-r16.safetensors``: one file (or shard set) per cap."""
    stem, ext = os.path.splitext(output)
    return f"{stem}-r{cap}{ext}"


def ranked_outputs(output: str, caps: Sequence[int], directory: bool) -> dict[int, str]:
    """Per cap, the output path: ``output`` itself for one cap, ``<stem>-r<cap><ext>`` each
    for several (``--rank 16,32,64``); for a PEFT directory (``directory``: ``output`` is
    ``<dir>/<weights>``), ``<dir>-r<cap>/<weights>``."""
    if len(caps) == 1:
        return {caps[0]: output}
    if directory:
        folder, name = os.path.split(output)
        return {cap: os.path.join(ranked_output(folder, cap), name) for cap in caps}
    return {cap: ranked_output(output, cap) for cap in caps}
