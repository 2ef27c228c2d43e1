"""The checkout's top-level folders are loraforge's subpackages, never top-level packages.

The design card keeps ``pipeline/``, ``stages/`` and ``kernels/`` at the top of the repository;
they install as ``loraforge.pipeline``, ``loraforge.stages`` and ``loraforge.kernels``. Python
started in the checkout (``python -m pytest``, ``python -c``, a REPL) puts the checkout root first
on ``sys.path``, so a plain ``import kernels`` (as today's ``transformers`` does for Hugging
Face's ``kernels`` package) would find our folder. Each folder's ``__init__`` calls
:func:`step_aside` when it is imported under its bare folder name: the import then gets the
installed package of that name, or fails as if the folder were not there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def step_aside(name: str, init_file: str) -> None:
    """Replace the module being imported as ``name`` (our folder whose ``__init__`` is
    ``init_file``, reached because the checkout root is on ``sys.path``) with the package of that
    name found on the rest of ``sys.path``; raise ``ModuleNotFoundError`` saying what shadowed
    what when there is none."""
    folder = os.path.dirname(os.path.realpath(init_file))
    root = os.path.dirname(folder)
    others = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r}: {folder} is loraforge's own folder, imported as "
            f"loraforge.{name}, not a top-level package (Python put the checkout root {root} on "
            f"sys.path because it was started there)",
            name=name,
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns what sys.modules holds after this
    spec.loader.exec_module(module)
