"""The memory budget of a run: how much there is, and the admission rule that keeps the tasks
running at once within it.

Every task declares the bytes it will allocate (its working set, from the plan: fp32 buffers,
kernel temporaries), and ``MemoryGate.admit`` holds a task back until the tasks already running
leave room for it. A task larger than the whole budget is planned blocked by its command (row
blocks, so its working set is a few blocks plus the kernel's small factors), never run as is.

Mapped checkpoint pages are not counted: they are clean file pages, which the kernel reclaims
under pressure (a cgroup limit included) instead of failing an allocation, and the reader drops
them after each tensor. What is counted is anonymous memory, which nothing reclaims.

The per-thread buffers that tasks reuse (``staging.thread_buffer``) stay allocated between
tasks, so they are charged to their thread while they exist; when a task does not fit, idle
threads' buffers are freed before it waits."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

from ..errors import UsageError
from . import staging

SAFE_FRACTION = 0.6  # of the memory available at start: the rest is the process's own (torch,
# Python, the client's export batch) and slack for estimates that run a little low
MIN_BUDGET = 64 * 2**20


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def _stat_value(path: str, names: tuple[str, ...]) -> int:
    try:
        with open(path) as f:
            values = dict(line.split() for line in f if line.strip())
    except (OSError, ValueError):
        return 0
    return next((int(values[n]) for n in names if n in values), 0)


def _cgroup_dirs() -> list[str]:
    """The memory cgroup directories of this process, itself and its ancestors (v1 or v2)."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    dirs = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        root = None
        if "memory" in controllers.split(","):
            root = "/sys/fs/cgroup/memory"
        elif controllers == "" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            root = "/sys/fs/cgroup"
        if root is None:
            continue
        parts = [p for p in path.split("/") if p]
        dirs += [os.path.join(root, *parts[:i]) for i in range(len(parts), -1, -1)]
    return dirs


def _cgroup_limits() -> Iterator[tuple[str, int]]:
    """Each of this process's memory cgroups that has a limit: its directory and the limit."""
    for d in _cgroup_dirs():
        limit = _read_int(os.path.join(d, "memory.limit_in_bytes")) or _read_int(
            os.path.join(d, "memory.max")
        )
        if limit is not None and limit < 1 << 60:  # "no limit" is a huge number in v1
            yield d, limit


def cgroup_available() -> int | None:
    """Bytes this process's memory cgroups still allow (limit − usage, not counting the
    reclaimable page cache), the tightest over the hierarchy; None without a limit."""
    tightest = None
    for d, limit in _cgroup_limits():
        usage = _read_int(os.path.join(d, "memory.usage_in_bytes")) or _read_int(
            os.path.join(d, "memory.current")
        )
        cache = _stat_value(
            os.path.join(d, "memory.stat"), ("total_inactive_file", "inactive_file")
        )
        left = max(limit - max((usage or 0) - cache, 0), 0)
        tightest = left if tightest is None else min(tightest, left)
    return tightest


def cgroup_limit() -> int | None:
    """The tightest memory limit of this process's cgroups; None without one."""
    return min((limit for _, limit in _cgroup_limits()), default=None)


def machine_memory() -> int:
    """All the memory this process could ever hold: the machine's, or its cgroup limit."""
    total = psutil.virtual_memory().total
    limit = cgroup_limit()
    return total if limit is None else min(total, limit)


def check_budget(budget: int | None, scheduler: str | None) -> None:
    """Refuse a ``--max-memory`` above what this machine has: tasks admitted against it would
    be killed for memory mid-run. On a ``--scheduler`` cluster the budget is each worker's, on
    machines this one cannot see: not checked."""
    if budget is None or scheduler:
        return
    have = machine_memory()
    if budget > have:
        raise UsageError(
            f"--max-memory {_size(budget)} is more than this machine has ({_size(have)}, "
            "cgroup limits included)",
            hint="give at most that, or leave --max-memory out for 60% of the memory available",
        )


def _size(n: int) -> str:
    unit, factor = next((u, f) for u, f in _UNITS if n >= f or u == "MB")
    return f"{n / factor:.3g} {unit}"


_UNITS = (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6))


def available_memory() -> int:
    """Memory this process can still allocate: the machine's available memory, or less where
    a cgroup limit says so."""
    available = psutil.virtual_memory().available
    limited = cgroup_available()
    return available if limited is None else min(available, limited)


def default_budget() -> int:
    """``--max-memory``'s default: a safe fraction of the memory available now."""
    return max(int(available_memory() * SAFE_FRACTION), MIN_BUDGET)


class MemoryGate:
    """Admission by declared bytes: the tasks running in this process, plus the reusable
    buffers their threads hold, stay within ``budget``. A task declaring more than the whole
    budget is admitted alone (its command should have planned it blocked)."""

    def __init__(self, budget: int):
        self.budget = budget
        self._running: dict[int, int] = {}  # thread ident -> declared bytes
        self._cond = threading.Condition()

    def _charged(self, exclude: int) -> int:
        """Bytes held by the other threads: a running task's declared bytes or its thread's
        buffers, whichever is more; an idle thread's buffers."""
        total = 0
        for ident in set(self._running) | set(staging.buffer_threads()):
            if ident == exclude:
                continue
            total += max(self._running.get(ident, 0), staging.buffer_bytes(ident))
        return total

    def _over(self, ident: int, nbytes: int) -> bool:
        return self._charged(ident) + max(nbytes, staging.buffer_bytes(ident)) > self.budget

    @contextmanager
    def admit(self, nbytes: int):
        ident = threading.get_ident()
        with self._cond:
            if self._over(ident, nbytes):
                for other in staging.buffer_threads():  # idle threads' buffers go first
                    if other != ident and other not in self._running:
                        staging.free_buffers(other)
            # Alone, even an oversized task runs: waiting could not make room for it.
            while self._running and self._over(ident, nbytes):
                self._cond.wait()
            self._running[ident] = nbytes
        try:
            yield
        finally:
            with self._cond:
                del self._running[ident]
                if self._charged(ident) + staging.buffer_bytes(ident) > self.budget:
                    staging.free_buffers(ident)
                self._cond.notify_all()


_gates: dict[int, MemoryGate] = {}
_gates_guard = threading.Lock()


def process_gate(budget: int) -> MemoryGate:
    """The gate of this process for ``budget`` (one per budget, so the tasks of one run,
    whatever worker thread runs them, share it)."""
    with _gates_guard:
        return _gates.setdefault(budget, MemoryGate(budget))


def gated(fn, nbytes: int, budget: int, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` once this process's gate admits ``nbytes``."""
    with process_gate(budget).admit(nbytes):
        return fn(*args, **kwargs)
