"""loraforge: extract, merge and apply LoRAs for checkpoints larger than RAM.

This file is the top of the ``loraforge`` package (pyproject.toml maps ``loraforge`` here): the
Python API. The command line is ``loraforge`` (``loraforge.pipeline.cli``).

    import loraforge
    loras = loraforge.LoraSet.from_config("lora.json")   # or LoraSet([("a.safetensors", 0.8)])
    handle = loraforge.apply(model, loras)               # a torch.nn.Module or a state dict
    handle.set_strengths([0.5]); handle.remove()         # original bytes restored exactly
"""

import importlib

from loraforge.pipeline import __version__

# Imported on first use (PEP 562): ``import loraforge.pipeline.cli`` passes through here, and
# the command line imports torch itself, after pausing the garbage collector (cli/__init__.py).
_API = {
    "AppliedLoras": "loraforge.pipeline.apply.handle",
    "apply": "loraforge.pipeline.apply.handle",
    "LoraSet": "loraforge.pipeline.apply.loraset",
}

__all__ = ["AppliedLoras", "LoraSet", "__version__", "apply"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'loraforge' has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_API[name]), name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
