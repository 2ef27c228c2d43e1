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
