"""Checks on the paths a user gives, made before any work starts: every path a run will write
(output files, report, work directory) against every input it reads and against each other,
after resolving symlinks, ``..`` and (on case-insensitive file systems) case."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import ModelMismatch, OutputError, UsageError
from ..io.reader import CheckpointIndex


@dataclass(frozen=True)
class UserPath:
    """A path and what the user called it (``--output``, ``--target-model``, ...)."""

    role: str
    path: str

    @property
    def resolved(self) -> str:
        return os.path.normcase(os.path.realpath(self.path))

    def describe(self) -> str:
        return f"{self.role} {self.path}"


def check_two_models(source: str, target: str) -> None:
    """The same checkpoint given as ``--source-model`` and ``--target-model`` differs from
    itself nowhere (extract would write an empty LoRA, verify divide by zero): refused before
    any work. Either path may be as typed: the message names both absolute."""
    source, target = (os.path.abspath(os.path.expanduser(p)) for p in (source, target))
    if os.path.exists(source) and os.path.exists(target) and os.path.samefile(source, target):
        raise ModelMismatch(
            f"is the --source-model too ({source}): a model does not differ from itself",
            path=target,
            hint="pass the fine-tuned checkpoint as --target-model",
        )


def checkpoint_paths(role: str, index: CheckpointIndex) -> list[UserPath]:
    """Every file of a checkpoint as an input: its tensor files and, for a shard directory,
    its index file(s)."""
    files = {info.file for info in index.tensors.values()}
    if os.path.isdir(index.path):
        files |= {
            os.path.join(index.path, name)
            for name in os.listdir(index.path)
            if name.endswith(".index.json")
        }
    return [UserPath(role, file) for file in sorted(files)]


def same_path(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name one file: equal once resolved, or (both existing) one inode,
    which also catches hard links and case-insensitive file systems."""
    if os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_path_argument(value: str | None, option: str) -> None:
    """An empty path option is refused, not taken as its default (``--report ''``)."""
    if value is not None and not value.strip():
        raise UsageError(f"{option} is empty", hint=f"give a path, or leave {option} out")


def check_output_argument(output: str, option: str = "--output") -> None:
    """An output (``option``: what the command calls it) that names no file is refused before
    it becomes ``<cwd>.safetensors`` or ``<dir>.safetensors``."""
    if not output.strip():
        raise UsageError(f"{option} is empty", hint="give the output's file name")
    if output.endswith(("/", os.sep)):
        raise UsageError(
            f"{option} {output} names a directory",
            hint=f"give a file name inside it for {option}",
        )
    if os.path.isdir(output):
        raise OutputError(
            "is a directory",
            path=os.path.abspath(os.path.expanduser(output)),
            hint=f"give a file name for {option}",
        )


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_writable_location(path: str, option: str) -> None:
    """Fail before any work if ``path`` (a file to write) could not be created where asked:
    its directory must exist writable, or be creatable under the nearest existing one. Nothing
    is created here: a run refused later leaves no trace; the writers make the directories."""
    if os.path.isdir(path):
        raise OutputError("is a directory", path=path, hint=f"give a file name for {option}")
    directory, noun = os.path.dirname(path) or ".", option.lstrip("-")
    existing = _nearest_existing(directory)
    if not os.path.isdir(existing):  # a file where a directory would go: what mkdir would say
        why = "File exists" if existing == directory else "Not a directory"
        raise OutputError(
            f"cannot create the {noun} directory ({why})",
            path=directory,
            hint=f"choose a writable {option} location",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "directory is not writable" if existing == directory else "directory cannot be made"
        raise OutputError(
            f"{noun} {what}",
            path=directory,
            hint=f"choose a writable {option} location",
        )


def check_paths(
    outputs: Iterable[UserPath], inputs: Iterable[UserPath], work_dir: UserPath | None
) -> None:
    """Refuse, in one line naming both paths, any written path that is an input, any two
    written paths that coincide, and a work directory that is an output or an input file
    (``work_dir`` None: a run without one)."""
    outputs, inputs = list(outputs), list(inputs)
    for written in outputs:
        for read in inputs:
            if same_path(written.path, read.path):
                raise UsageError(
                    f"{written.role} would overwrite the input {read.describe()}",
                    path=written.path,
                    hint=f"choose another {written.role}",
                )
    for i, first in enumerate(outputs):
        for second in outputs[i + 1 :]:
            if same_path(first.path, second.path):
                raise UsageError(
                    f"{first.role} and {second.role} are the same file",
                    path=first.path,
                    hint=f"choose another {second.role}",
                )
    for other in [*outputs, *inputs] if work_dir is not None else []:
        if same_path(work_dir.path, other.path) or _inside(other.path, work_dir.path):
            if other in outputs and not same_path(work_dir.path, other.path):
                continue  # an output inside the work directory is fine: never deleted
            raise UsageError(
                f"--work-dir {'is' if same_path(work_dir.path, other.path) else 'holds'} "
                f"{other.describe()}",
                path=work_dir.path,
                hint="pass a new or empty directory as --work-dir",
            )


def _inside(path: str, directory: str) -> bool:
    real, folder = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([real, folder]) == folder and real != folder
