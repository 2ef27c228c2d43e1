"""Where a task's time goes: a clock that charges the time since its last lap to a named phase
(read, product, cast, check, write, ...). Tasks put ``seconds`` in their markers; the report sums
them over the run (``task_seconds``), so a benchmark can say which phase a command spends on."""

from __future__ import annotations

import time
from collections.abc import Iterable


class PhaseClock:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap (or the start) to ``phase``."""
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def rounded(self) -> dict[str, float]:
        return {phase: round(seconds, 4) for phase, seconds in self.seconds.items()}


def task_seconds(markers: Iterable[dict]) -> dict[str, float]:
    """Per phase, the seconds every task spent there (``phases`` in their markers)."""
    total: dict[str, float] = {}
    for marker in markers:
        for phase, seconds in (marker.get("phases") or {}).items():
            total[phase] = total.get(phase, 0.0) + seconds
    return {phase: round(seconds, 3) for phase, seconds in total.items()}
