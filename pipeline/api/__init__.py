"""loraforge: extract, merge and apply LoRAs for checkpoints larger than RAM.

This file is the top of the ``loraforge`` package (pyproject.toml maps ``loraforge`` here): the
Python API. The command line is ``loraforge`` (``loraforge.pipeline.cli``).

    import loraforge
    loras = loraforge.LoraSet.from_config("lora.json")   # or LoraSet([("a.safetensors", 0.8)])
    handle = loraforge.apply(model, loras)               # a torch.nn.Module or a state dict
    handle.set_strengths([0.5]); handle.remove()         # original bytes restored exactly
"""

from loraforge.pipeline import __version__
from loraforge.pipeline.apply.handle import AppliedLoras, apply
from loraforge.pipeline.apply.loraset import LoraSet

__all__ = ["AppliedLoras", "LoraSet", "__version__", "apply"]
