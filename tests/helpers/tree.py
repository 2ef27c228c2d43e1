"""A directory tree's state, to check that a refused run changed nothing the user had."""

from __future__ import annotations

import hashlib
import os
import shutil


def snapshot(root: str) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): a file's sha256, a symlink's target,
    ``dir`` for a directory."""
    entries = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                entries[rel] = "link -> " + os.readlink(path)
            elif os.path.isdir(path):
                entries[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    entries[rel] = hashlib.sha256(f.read()).hexdigest()
    return entries


def changes(before: dict[str, str], after: dict[str, str], leaves=()) -> tuple[list, list]:
    """``(changed or removed, new)`` entries between two snapshots; entries under ``leaves``
    (relative paths a run may leave) are not counted as new."""
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    new = sorted(
        k
        for k in set(after) - set(before)
        if not any(k == a or k.startswith(a + "/") for a in leaves)
    )
    return changed, new


def working_copy(master: str, tmp_path) -> str:
    """A test's own copy of a module's input tree (``<tmp_path>/t``, with an empty ``out/``), so
    a test that misbehaves cannot change another's inputs."""
    root = os.path.join(os.path.realpath(tmp_path), "t")
    shutil.copytree(master, root)
    os.makedirs(os.path.join(root, "out"))
    return root
