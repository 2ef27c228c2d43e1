"""``convert``: read a LoRA's headers → plan the output names → stream tensor by tensor into the
shared LoRA writer → publish with the report.

Bytes are copied, never recomputed: every factor and diff keeps its dtype and bits, and alpha
keeps its value (a new alpha tensor is only made where the source kept alpha elsewhere), so a
merge gives the same bytes, and a conversion there and back the same tensors (an alpha that
went through a style keeping it in a config comes back in its factors' dtype: the same value).
One tensor is in memory at a time, whatever the LoRA's size."""

from __future__ import annotations

import os

import torch

from ..errors import CheckpointNotFound, LoraMismatch
from ..export.clients import judge
from ..export.writer import config_file, lora_location, open_lora_output
from ..io import safetensors_format as stf
from ..io.reader import index_checkpoint, load_tensor
from ..io.writer import PRODUCER
from ..lora.inputs import OpenedLora, read_lora
from ..lora.keys import Unmatched
from ..lora.styles import check_output, key_style
from ..run.command import execute
from ..run.options import RunOptions
from ..run.paths import UserPath, checkpoint_paths
from ..run.report import build_report
from ..run.session import Progress, Session
from .plan import ConvertPlan, ConvertWeight, plan_convert


def convert(
    *,
    lora: str,
    output: str,
    to: str,
    base: str | None = None,
    lora_type: str | None = None,
    base_type: str = "safetensors",
    max_shard_size: int | None = None,
    run: RunOptions | None = None,
    progress: Progress | None = None,
) -> dict:
    """Write the LoRA at ``lora`` (a file, shard directory or PEFT adapter directory) in key
    style ``to`` at ``output``; return the report (also saved as JSON)."""
    style = key_style(to, "--to")
    run, output = lora_location(run or RunOptions(), output, style)
    check_output(style, "safetensors", max_shard_size, "--to")
    command = Conversion(lora, lora_type, style, base, base_type, max_shard_size)
    return execute(command, run, output, progress)


class Conversion:
    """The conversion filled into the command skeleton: no work directory, one pass."""

    name = "convert"
    work = None
    output_format = "safetensors"
    output_option = "OUT"  # its output is an argument, not --output

    def __init__(self, lora: str, lora_type, style, base, base_type, max_shard_size):
        self.lora = os.path.abspath(os.path.expanduser(lora))
        self.lora_type, self.style = lora_type, style
        self.base, self.base_type, self.max_shard_size = base, base_type, max_shard_size

    def prepare(self, session: Session) -> None:
        lora, style = self.lora, self.style
        if not os.path.exists(lora):
            raise CheckpointNotFound("LoRA not found", path=lora, hint="check IN")
        self.opened = opened = read_lora(lora, self.lora_type)
        base_index = index_checkpoint(self.base, self.base_type) if self.base else None
        inputs = _input_paths(lora, opened)
        if base_index is not None:
            inputs += checkpoint_paths("--base", base_index)
        config = config_file(session.output, style)
        session.check_paths(inputs, [config] if config else [])
        shapes = {k: i.shape for k, i in base_index.tensors.items()} if base_index else None
        self.plan = plan = plan_convert(opened, style, shapes)
        if not plan.weights:
            first = plan.left_out[0] if plan.left_out else None
            example = f", e.g. '{first.lora_key}': {first.reason}" if first else ""
            raise LoraMismatch(f"nothing to write in the {style.name} style{example}", path=lora)
        self.clients = judge(plan.style, plan.entries)
        self.warnings = [
            *opened.warnings,
            *_left_out_warning(plan.left_out),
            *(self.clients.warnings() if self.clients else ()),
        ]
        for warning in self.warnings:
            session.emit("warning", {"message": warning})

    def begin(self, session: Session, previous: dict | None) -> dict:
        raise NotImplementedError("convert keeps no work directory")

    def run(self, session: Session) -> dict:
        plan = self.plan
        session.start(
            tensors=len(plan.weights),
            total_bytes=sum(e.nbytes for e in plan.entries),
            done=0,
            done_bytes=0,
            changes=[],
        )
        writer = session.add_writer(
            open_lora_output(
                session.output,
                plan.style,
                [w.written() for w in plan.weights],
                plan.entries,
                max_shard_size=self.max_shard_size,
                metadata=PRODUCER,
            )
        )
        for weight in plan.weights:
            for role, name in weight.names.items():
                writer.write(name, _tensor(weight, role))
            session.emit("tensor", {"key": weight.key, "bytes": _read_bytes(weight)})
        session.emit("write", {"tensors": len(plan.weights)})
        report = _report(plan, self.opened, self.lora, self.base, session, self.warnings)
        verdicts = self.clients
        report["summary"]["clients"] = (
            verdicts.report(plan.weights, plan.style, report["tensors"]) if verdicts else None
        )
        return report


def _input_paths(lora: str, opened: OpenedLora) -> list[UserPath]:
    paths = checkpoint_paths("IN", opened.index)
    if os.path.isdir(lora):
        paths.append(UserPath("IN", lora))
    if opened.config:
        paths.append(UserPath("IN", opened.config))
    return paths


def _tensor(weight: ConvertWeight, role: str) -> torch.Tensor:
    """The source tensor for ``role`` as stored, the identity of a diff written as an exact
    pair, or a new alpha holding the source's value."""
    info = weight.sources.get(role)
    if info is not None:
        return load_tensor(info)
    if role == weight.identity:
        diff = next(iter(weight.sources.values()))
        return torch.eye(weight.rank, dtype=stf.DTYPE_BY_CODE[diff.dtype])
    return torch.tensor(weight.alpha, dtype=stf.DTYPE_BY_CODE[weight.alpha_code])


def _read_bytes(weight: ConvertWeight) -> int:
    return sum(info.nbytes for info in weight.sources.values())


def _left_out_warning(left_out: list[Unmatched]) -> list[str]:
    if not left_out:
        return []
    first = left_out[0]
    count = f"{len(left_out)} LoRA key{'s' if len(left_out) != 1 else ''}"
    return [f"{count} not written (listed in the report), e.g. '{first.lora_key}': {first.reason}"]


def _report(
    plan: ConvertPlan, opened: OpenedLora, lora: str, base, session: Session, warnings
) -> dict:
    tensors = {
        w.key: {
            "kind": w.kind,
            "rank": w.rank,
            "alpha": w.alpha,
            "from": sorted(info.key for info in w.sources.values()),
            "names": sorted(w.names.values()),
            "status": "converted",
        }
        for w in plan.weights
    }
    extra = {
        "output": session.output,
        "key_style": plan.style.name,
        "left_out": {u.lora_key: u.reason for u in plan.left_out},
        "warnings": warnings,
    }
    options = {"to": plan.style.name, "base": base}
    inputs = {"lora": lora, "file": opened.file, "base": base}
    return build_report("convert", options, inputs, tensors, extra, session.started)
