"""What the loaders a key style writes for will apply of the file being written (``lora/clients``),
named at write time: a warning per client that refuses the file or leaves entries out, the
verdicts in the report's summary and, per tensor, which client leaves it out and why. Judged for
model families whose loaders' rules are known (Wan); other models are not judged."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..io.layout import OutputEntry
from ..lora.clients import Loading, LoraFile, client_loadings
from ..lora.styles import KeyStyle


@dataclass(frozen=True)
class ClientVerdicts:
    loadings: dict[str, Loading]  # the style's clients, by name

    def warnings(self) -> list[str]:
        """One line per client that refuses the file or leaves entries out."""
        lines = []
        for loading in self.loadings.values():
            if loading.refused or loading.not_applied:
                lines.append(f"{loading.summary()} (per tensor in the report)")
        return lines

    def report(self, tasks: Iterable, style: KeyStyle, tensors: dict[str, dict]) -> dict:
        """The report's ``summary.clients``; each of ``tasks`` a client leaves out gets
        ``not_applied_by`` (client → why; a refused file: every tensor) in ``tensors``."""
        for task in tasks:
            outputs = task.outputs
            label = outputs["diff"] if "diff" in outputs else outputs["up"].removesuffix(style.up)
            for name, loading in self.loadings.items():
                why = loading.refused or loading.not_applied.get(label)
                if why:
                    tensors[task.key].setdefault("not_applied_by", {})[name] = why
        return {name: loading.to_dict() for name, loading in self.loadings.items()}


def judge(style: KeyStyle, entries: Sequence[OutputEntry]) -> ClientVerdicts | None:
    """The verdicts of the style's clients on a file holding ``entries``; None for a model of
    no family whose loaders are known."""
    if style.family is None or not style.clients:
        return None
    file = LoraFile.from_shapes({e.name: e.shape for e in entries}, peft_config=style.directory)
    loadings = client_loadings(file)
    return ClientVerdicts({name: loadings[name] for name in style.clients})
