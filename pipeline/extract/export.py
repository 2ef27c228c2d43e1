"""The write stage of an extraction: fp32 intermediates → chosen ranks → cast → output file(s).

Runs where the output is (the client). The ranks are decided per output (one per ``--rank``
cap) by the rank rule from the stored spectra, then every finished result is written into each
output, one batch in memory at a time (``lora/export.py``, shared with ``resize``); the error
reported per tensor is that of what is stored, after the cast to the output dtype."""

from __future__ import annotations

from ..lora import export as lora_export
from ..lora.export import RankedOutput
from ..lora.rank_options import ranked_outputs
from .plan import ExtractionPlan


def output_files(plan: ExtractionPlan, output: str) -> dict[int, str]:
    """Per cap, the output path (``lora.rank_options.ranked_outputs``)."""
    return ranked_outputs(output, plan.options.ranks, plan.options.style.directory)


def written_files(plan: ExtractionPlan, output: str) -> list[str]:
    """Every output file beside ``output`` the run writes: other caps' outputs, PEFT
    configs."""
    return lora_export.written_beside(output, plan.options.ranks, plan.options.style)


def open_outputs(
    plan: ExtractionPlan, markers: dict[str, dict], values: dict[str, list[float]], output: str
) -> list[RankedOutput]:
    """One writer per cap, laid out at the ranks the rule chooses from the stored spectra."""
    options = plan.options
    return lora_export.open_outputs(
        plan.tasks,
        markers,
        values,
        output_files(plan, output),
        options.rank_rule,
        options.style,
        options.torch_dtype,
        options.output_format,
        options.max_shard_size,
    )
