"""Merge planning from headers alone: one task per base tensor, decided before any data is read.

A task names its base tensor and the LoRA tensors that patch it (addresses, never data), each
with its factor strength · alpha · scale. The output holds every base key, sorted, at the base's
shapes, so its header(s) are fixed before the first tensor is computed."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UsageError
from ..io import safetensors_format as stf
from ..io.fp8 import CONFIG_SUFFIX, MARKER, QUANT_METADATA, is_fp8, is_marker, retarget
from ..io.layout import OutputEntry
from ..io.reader import CheckpointIndex, TensorInfo
from ..lora.inputs import LoraInput
from ..lora.keys import Unmatched
from ..lora.patches import PatchRef, collect_patches
from .options import MergeOptions


@dataclass(frozen=True)
class MergeTask:
    key: str
    kind: str  # "merged" | "cast" | "copied"
    base: TensorInfo
    out_dtype: str  # safetensors code
    patches: tuple[PatchRef, ...] = ()
    # Scaled-fp8 output (fp8.py): "value" is the tensor itself; "scale" writes the scale of the
    # weight ``base`` (computed as its value task computes it); "marker" the empty marker.
    part: str = "value"
    quantized: bool = False  # the value is written as fp8 with a scale of its own
    out_shape: tuple[int, ...] | None = None  # a scale's or marker's shape (else the base's)

    @property
    def name(self) -> str:
        """Readable, stable Dask key."""
        return f"{self.kind}-{self.key}"

    @property
    def read_bytes(self) -> int:
        if self.part == "marker" or (self.part == "scale" and not self.quantized):
            return 0  # written without reading (fp8.py fp8_result)
        return self.base.nbytes + sum(t.nbytes for p in self.patches for t in p.tensors)

    @property
    def entry(self) -> OutputEntry:
        shape = self.base.shape if self.out_shape is None else self.out_shape
        return OutputEntry(self.key, self.out_dtype, shape)


@dataclass(frozen=True)
class MergePlan:
    options: MergeOptions
    tasks: list[MergeTask]  # sorted by key: the output's order
    unmatched: list[list[Unmatched]]  # per LoRA, in the merge's order
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)  # output header's own
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)  # base key -> why

    @property
    def entries(self) -> list[OutputEntry]:
        return [t.entry for t in self.tasks]

    @property
    def total_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_merge(
    base: CheckpointIndex, loras: Sequence[LoraInput], options: MergeOptions
) -> MergePlan:
    out_code = stf.CODE_BY_DTYPE[options.torch_dtype]
    patches, unmatched = collect_patches(base.tensors, loras, options.alpha)
    if is_fp8(out_code):
        tasks, metadata = plan_fp8(base, patches, out_code)
        if metadata and options.output_format == "pytorch":
            raise UsageError(
                f"--output-dtype {options.output_dtype} keeps this base's quantization config in "
                f"the safetensors header ({', '.join(metadata)}), which a PyTorch file cannot hold",
                path=base.path,
                hint="use --output-format safetensors",
            )
        return MergePlan(options, tasks, unmatched, metadata)

    # A scaled-fp8 base's scales and markers would rescale the dequantized output: dropped.
    dropped = {k: f"{why}; the output is not fp8" for k, why in base.fp8.companions.items()}
    tasks = []
    for key in sorted(set(base.tensors) - set(dropped)):
        info = base.tensors[key]
        code = out_code if info.is_float else info.dtype
        if key in patches:
            kind = "merged"
        elif code == info.dtype and info.scale is None:
            kind = "copied"
        else:
            kind = "cast"
        tasks.append(MergeTask(key, kind, info, code, tuple(patches.get(key, ()))))
    return MergePlan(options, tasks, unmatched, dropped=dropped)


# Linear layers of a transformer: 2-D weights inside numbered blocks (``blocks.3.``,
# ``transformer_blocks.0.``, ``layers.11.``), norms and embeddings aside. LightX2V's converter
# quantizes the same (tools/convert/converter.py quantize_model: 2-D weights of the blocks'
# attention and feed-forward layers; the rest kept in a float dtype).
_BLOCK_LINEAR = re.compile(r"(?:^|\.)\w*(?:blocks|layers)\.\d+\.")


def block_linear(key: str, info: TensorInfo) -> bool:
    return (
        len(info.shape) == 2
        and key.endswith(".weight")
        and _BLOCK_LINEAR.search(key) is not None
        and "norm" not in key
        and "emb" not in key
    )


def _quantized(key: str, info: TensorInfo, convention: str | None, fp8_base: bool) -> bool:
    if info.scale is not None:
        return True
    if convention is not None:  # a scaled base: its scaled weights, no others
        return False
    if fp8_base:  # fp8 without scales: its fp8 matrices gain scales
        return is_fp8(info.dtype) and len(info.shape) == 2 and key.endswith(".weight")
    return block_linear(key, info)


def _check_configs(base: CheckpointIndex, out_code: str) -> None:
    """A layer labelled by a ``.comfy_quant`` tensor keeps that tensor's bytes (planning never
    reads contents), so its weight cannot change fp8 type under it."""
    for weight in base.fp8.scales:
        config = weight.removesuffix(".weight") + CONFIG_SUFFIX
        code = base.tensors[weight].dtype
        if config in base.tensors and code != out_code:
            raise UsageError(
                f"is {code}, and its layer's quantization config tensor {config!r} says so; "
                f"--output-dtype fp8_e4m3fn cannot relabel it",
                path=base.path,
                key=weight,
                hint="merge into bf16, or re-save the base as float8_e4m3fn",
            )


def plan_fp8(
    base: CheckpointIndex, patches: dict[str, list[PatchRef]], out_code: str
) -> tuple[list[MergeTask], dict[str, str]]:
    """Tasks writing a scaled-fp8 checkpoint in the base's convention (io/fp8.py; the
    ``scaled_fp8`` one for a base without scales), and the header metadata it needs.

    Quantized: the base's scaled weights (and, in a base without scales, its fp8 2-D
    ``.weight`` tensors), or for a base without fp8 the linear layers (``block_linear``). Each gets
    an fp32 scale, per tensor (per row where the base's scale is per row); an unpatched weight
    already in ``out_code`` keeps its bytes and its scale. Every other tensor keeps its dtype."""
    layout = base.fp8
    _check_configs(base, out_code)
    fp8_base = any(is_fp8(i.dtype) for i in base.tensors.values())
    scaled_by = {scale: weight for weight, scale in layout.scales.items()}
    tasks: list[MergeTask] = []
    for key, info in sorted(base.tensors.items()):
        refs = tuple(patches.get(key, ()))
        kind = "merged" if refs else "cast"
        if key in scaled_by:
            weight = base.tensors[scaled_by[key]]
            wrefs = tuple(patches.get(weight.key, ()))
            if wrefs or weight.dtype != out_code:
                wkind = "merged" if wrefs else "cast"
                tasks.append(MergeTask(key, wkind, weight, "F32", wrefs, "scale", True, info.shape))
                continue
        if is_marker(key) and info.dtype != out_code:  # the marker names the fp8 dtype
            tasks.append(MergeTask(key, "cast", info, out_code, (), "marker", out_shape=info.shape))
        elif key in layout.companions:
            tasks.append(MergeTask(key, "copied", info, info.dtype))
        elif _quantized(key, info, layout.convention, fp8_base):
            if not refs and info.dtype == out_code:
                kind = "copied"
            tasks.append(MergeTask(key, kind, info, out_code, refs, quantized=kind != "copied"))
            if info.scale is None:  # a scale of its own; 1 for fp8 bytes kept as they are
                scale, kept = layout.scale_key(key), kind == "copied"
                skind = "cast" if kept else kind
                tasks.append(MergeTask(scale, skind, info, "F32", refs, "scale", not kept, ()))
        else:
            kind = kind if refs else "copied"
            tasks.append(MergeTask(key, kind, info, info.dtype, refs))
    quantized = any(t.part == "scale" for t in tasks)
    if layout.convention is None and quantized and MARKER not in base.tensors:
        first = next(t.base for t in tasks if t.part == "scale")
        tasks.append(MergeTask(MARKER, "cast", first, out_code, (), "marker", out_shape=(0,)))
    metadata = {
        k: retarget(v, out_code) if k == QUANT_METADATA else v for k, v in layout.metadata.items()
    }
    return sorted(tasks, key=lambda t: t.key), metadata
