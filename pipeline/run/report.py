"""The JSON run report and its one-screen summary."""

from __future__ import annotations

import time
from collections import Counter

from .. import __version__


def build_report(
    command: str, options: dict, inputs: dict, tensors: dict[str, dict], extra: dict, started: float
) -> dict:
    kinds = Counter(entry["kind"] for entry in tensors.values())
    status = Counter(entry.get("status", "n/a") for entry in tensors.values())
    return {
        "loraforge": __version__,
        "command": command,
        "options": options,
        "inputs": inputs,
        "summary": {
            "kinds": dict(sorted(kinds.items())),
            "status": dict(sorted(status.items())),
            "seconds": round(time.time() - started, 3),
            **extra,
        },
        "tensors": dict(sorted(tensors.items())),
    }


def blocked_note(blocked: dict) -> str:
    """The report's note for a tensor that ran in row blocks (its marker's ``blocked``)."""
    passes = f", {blocked['passes']} passes" if "passes" in blocked else ""
    return (
        f"ran blocked: {blocked['blocks']} blocks of {blocked['block_rows']} rows{passes} "
        "(larger than the memory budget)"
    )


def memory_summary(budget: int, tensors: dict[str, dict]) -> dict:
    """The run's memory budget and the tensors that ran blocked under it."""
    return {
        "budget_bytes": budget,
        "blocked": sorted(k for k, e in tensors.items() if "ran blocked" in e.get("note", "")),
    }
