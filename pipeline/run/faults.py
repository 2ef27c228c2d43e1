"""Crash injection for the crash-safety tests.

``LORAFORGE_CRASH_AT=compute:N`` (or ``write:N``) makes a run SIGKILL its whole process group
once N tensors are finished, those reused from a previous run included (or N output tensors
are written): the same as an external ``kill -9 -PGID`` at a chosen point, without a race
against the clock."""

from __future__ import annotations

import os
import signal


def maybe_crash(phase: str, count: int) -> None:
    point = os.environ.get("LORAFORGE_CRASH_AT")
    if point and point == f"{phase}:{count}":
        os.killpg(os.getpgrp(), signal.SIGKILL)
