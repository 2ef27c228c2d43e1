"""Typed errors. Each names the file and, where there is one, the tensor, and says what to do.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``;
``LORAFORGE_TRACEBACK=1`` shows the traceback instead. Each also derives from the built-in a
library caller would catch (``FileNotFoundError``, ``ValueError``, ...).

Exit codes: 1 bad input or environment, 2 bad option (as click's own usage errors), 3 a work
directory in a state this run cannot use (another command's, or locked by a live run), 130
interrupted.
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

    def __str__(self) -> str:  # OSError subclasses would format their own way
        return str(self.args[0]) if self.args else ""


class UsageError(LoraforgeError, ValueError):
    """A bad option value; exit code 2 like click's own usage errors."""

    exit_code = 2


class CheckpointNotFound(LoraforgeError, FileNotFoundError):
    pass


class CheckpointFormatError(LoraforgeError, ValueError):
    """Truncated, corrupt or unexpected checkpoint contents."""


class UnsafePickle(CheckpointFormatError):
    """A PyTorch pickle that needs arbitrary code to load."""


class NonFiniteTensor(LoraforgeError, ValueError):
    pass


class NonFiniteOutput(NonFiniteTensor):
    """A tensor loraforge computed would be written holding NaN or Inf (a strength or scale
    too large for the output dtype, say): refused as it is cast, before it is written."""


class LoraMismatch(LoraforgeError, ValueError):
    """LoRA keys that patch nothing in the base (``--strict``), or a LoRA that fits nowhere."""


class ModelMismatch(LoraforgeError, ValueError):
    """Two models that do not belong together: nothing to extract from their difference."""


class ShapeMismatch(LoraMismatch):
    """A LoRA tensor whose shape cannot patch the base tensor its name targets (``--strict``)."""


class OutputError(LoraforgeError, OSError):
    """The output cannot be written where asked."""


class WorkDirConflict(LoraforgeError, RuntimeError):
    """The work directory holds another command's run, so its state cannot be resumed."""

    exit_code = 3


class WorkDirLocked(WorkDirConflict):
    """Another live run holds the work directory's lock."""


class ClusterError(LoraforgeError, RuntimeError):
    """A Dask cluster that cannot be reached or cannot run the tasks (no GPU workers, workers
    that keep dying on one tensor)."""


class ArgumentTypeError(UsageError, TypeError):
    """A value of the wrong type given to the Python API (``set_strengths(0.5)``)."""


class NotApplied(UsageError, IndexError, KeyError):
    """A LoRA named to the Python API that the handle does not hold (a path, or a position)."""


class AlreadyPatched(UsageError):
    """A weight another live ``apply()`` handle has patched: change that handle instead."""


class OriginalsChanged(LoraforgeError, RuntimeError):
    """The checkpoint an ``apply()`` handle re-reads originals from no longer holds them."""


class OriginalsGone(OriginalsChanged, FileNotFoundError):
    """The checkpoint an ``apply()`` handle re-reads originals from is gone."""


class RestoreFailed(LoraforgeError, RuntimeError):
    """A change through the Python API failed, and putting back the weights it had already
    changed failed too: those weights are named."""


class Interrupted(LoraforgeError):
    """SIGINT/SIGTERM: finished work is kept."""

    exit_code = 130


class MissingDependency(LoraforgeError, ImportError):
    """A command needs packages of an extra that is not installed (``infer``, ``serve``)."""
