"""How a command runs, as opposed to what it computes: the options every command shares."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .memory import MIN_BUDGET


@dataclass(frozen=True)
class RunOptions:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int | None = None  # tensors at once (threads per GPU worker with gpus)
    scheduler: str | None = None  # address or scheduler file of a running Dask cluster
    gpus: str | None = None  # "all" or "0,2": one pinned worker process per GPU
    work_dir: str | None = None  # default: <output>.work
    resume: bool = True  # reuse finished work left in the work directory
    keep_work: bool = True  # keep reusable intermediates after success (extract)
    report: str | None = None  # default: <output stem>.report.json
    json: bool = False  # JSON event lines on stdout instead of a bar and tables
    quiet: bool = False  # nothing but errors and warnings
    max_memory: int | None = None  # bytes the running tasks may hold; default: memory.py

    def __post_init__(self):
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers must be >= 1, got {self.workers}")
        if self.max_memory is not None and self.max_memory < MIN_BUDGET:
            raise UsageError(
                f"--max-memory must be at least {MIN_BUDGET // 2**20} MiB, got {self.max_memory} "
                "bytes"
            )
