"""PEFT's ``PeftModel.from_pretrained`` (peft 0.21.2): a directory with ``adapter_config.json``
and ``adapter_model.safetensors`` whose keys are ``base_model.model.<module>.lora_A`` /
``lora_B`` (``.weight``), named as the model the adapter is loaded into names its modules;
scales from the config's ``r`` / ``lora_alpha`` and patterns."""

from __future__ import annotations

from . import Loading, LoraFile, judged

CLIENT = "peft"


def verdict(entry) -> str | None:
    if not entry.module.startswith("base_model.model.") or entry.naming != "peft":
        return "PEFT loads base_model.model.<module>.lora_A/lora_B weights only"
    return None


def loading(file: LoraFile) -> Loading:
    if not file.peft_config:
        return Loading(CLIENT, "not a PEFT adapter directory (no adapter_config.json)")
    return judged(CLIENT, file.entries, verdict)
