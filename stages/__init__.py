"""Pure per-tensor stages: tensors in, tensors out; no I/O, no globals, no device choice.

``STAGES`` lists them; ``get_stage`` names the valid ones when asked for an unknown one."""

from collections.abc import Callable

from .cast import cast
from .diff import is_unchanged, max_abs, weight_delta
from .lowrank import METHODS, lowrank
from .merge import Delta, merge_weight

STAGES: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> None:
    if name in STAGES:
        raise ValueError(f"stage {name!r} is already registered")
    STAGES[name] = fn


def get_stage(name: str) -> Callable:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; valid: {', '.join(sorted(STAGES))}") from None


register("diff", weight_delta)
register("lowrank", lowrank)
register("cast", cast)
register("merge", merge_weight)

__all__ = [
    "METHODS",
    "Delta",
    "STAGES",
    "cast",
    "get_stage",
    "is_unchanged",
    "lowrank",
    "max_abs",
    "merge_weight",
    "register",
    "weight_delta",
]
