"""Typed errors. Each names the file and, where there is one, the tensor, and says what to do.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``;
``LORAFORGE_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations


class LoraforgeError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        hint: str | None = None,
    ):
        self.path = path
        self.key = key
        self.hint = hint
        where = []
        if path is not None:
            where.append(str(path))
        if key is not None:
            where.append(f"tensor '{key}'")
        text = f"{': '.join(where)}: {message}" if where else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)


class UsageError(LoraforgeError):
    """A bad option value; exit code 2 like click's own usage errors."""

    exit_code = 2


class CheckpointNotFound(LoraforgeError):
    pass


class CheckpointFormatError(LoraforgeError):
    """Truncated, corrupt or unexpected checkpoint contents."""


class UnsafePickle(LoraforgeError):
    """A PyTorch pickle that needs arbitrary code to load."""


class ShapeMismatch(LoraforgeError):
    pass


class NonFiniteTensor(LoraforgeError):
    pass


class LoraMismatch(LoraforgeError):
    """LoRA keys that patch nothing in the base (``--strict``), or a LoRA that fits nowhere."""


class OutputError(LoraforgeError):
    """The output cannot be written where asked."""


class ResumeMismatch(LoraforgeError):
    pass


class WorkDirLocked(LoraforgeError):
    pass


class ClusterError(LoraforgeError):
    """A Dask cluster that cannot be reached or cannot run the tasks (no GPU workers, workers
    that keep dying on one tensor)."""


class Interrupted(LoraforgeError):
    """SIGINT/SIGTERM: finished work is kept."""

    exit_code = 130
