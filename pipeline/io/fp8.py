"""Scaled-fp8 checkpoints, from headers alone: which convention a checkpoint follows, which
tensor scales which weight, and which tensors are bookkeeping rather than weights.

Conventions, as their loaders read them (``W = W_fp8 · scale``, scale one value or one per row):

- ``scaled_fp8`` (Wan / Qwen "fp8_scaled" files, ComfyUI's older format): a ``scaled_fp8``
  marker tensor (its dtype names the fp8 type; ComfyUI writes it empty, ``model_base.py``
  ``state_dict_for_saving``) and ``<layer>.scale_weight`` (fp32) beside each fp8
  ``<layer>.weight``; ``<layer>.scale_input`` scales activations, never the weight. ComfyUI reads
  it in ``comfy/utils.py`` ``convert_old_quants`` (``scale_weight`` → ``weight_scale``, every
  layer ``float8_e4m3fn``); the older ``comfy/ops.py`` ``scaled_fp8_ops`` multiplied in
  ``convert_weight``. Without the marker ComfyUI applies no scale, so scales without it are
  refused here.
- ``comfy_quant`` (ComfyUI's newer format): ``__metadata__["_quantization_metadata"]`` =
  ``{"layers": {<layer>: {"format": "float8_e4m3fn" | "float8_e5m2", ...}}}`` and
  ``<layer>.weight_scale`` (fp32, one value); ``<layer>.input_scale`` for activations.
  ComfyUI ``comfy/ops.py`` ``mixed_precision_ops`` ``Linear._load_from_state_dict``. ComfyUI's
  own saves carry the same config per layer instead, as a ``<layer>.comfy_quant`` tensor (its
  JSON as uint8), the header metadata optional; such a tensor marks its layer quantized too.
- ``lightx2v`` (LightX2V's own quantized files): ``<layer>.weight_scale`` beside an fp8
  ``<layer>.weight``, one scale per row ``[out, 1]`` (``lightx2v/common/ops/mm/mm_weight.py``,
  ``weight_scale_name``; written by ``tools/convert/quant/quant.py``), no metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from ..errors import CheckpointFormatError
from .safetensors_format import FLOAT_CODES

FP8_CODES = ("F8_E4M3", "F8_E5M2")
MARKER = "scaled_fp8"
QUANT_METADATA = "_quantization_metadata"
FP8_FORMATS = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
CONFIG_SUFFIX = ".comfy_quant"  # ComfyUI's per-layer quantization config tensor
CONFIG_WHY = "quantization config (bookkeeping, not a weight)"
# Per convention: the suffix of a weight's scale.
SCALE_SUFFIX = {
    "scaled_fp8": ".scale_weight",
    "comfy_quant": ".weight_scale",
    "lightx2v": ".weight_scale",
}


@dataclass(frozen=True)
class Fp8Layout:
    """A checkpoint's scaled-fp8 bookkeeping. ``convention`` is None when nothing is scaled."""

    convention: str | None = None
    scales: dict[str, str] = field(default_factory=dict)  # weight key -> its scale's key
    companions: dict[str, str] = field(default_factory=dict)  # key -> why it is no weight
    metadata: dict[str, str] = field(default_factory=dict)  # header metadata the format needs

    def scale_key(self, weight_key: str) -> str:
        """The key a scale for ``weight_key`` takes in this convention (``scaled_fp8`` when the
        checkpoint has none)."""
        return weight_key.removesuffix(".weight") + SCALE_SUFFIX[self.convention or "scaled_fp8"]


def is_fp8(code: str) -> bool:
    return code in FP8_CODES


def is_marker(key: str) -> bool:
    return key == MARKER or key.endswith("." + MARKER)


def retarget(text: str, code: str) -> str:
    """``_quantization_metadata`` text with every layer's format the fp8 type ``code`` (the
    weights a merge writes are all of that type); unchanged text when they already are."""
    quant = json.loads(text)
    fmt = next(name for name, c in FP8_FORMATS.items() if c == code)
    if all(conf.get("format") == fmt for conf in quant["layers"].values()):
        return text
    for conf in quant["layers"].values():
        conf["format"] = fmt
    return json.dumps(quant)


def find_layout(path: str, tensors: dict, metadata: dict[str, str]) -> Fp8Layout:
    """The scaled-fp8 layout of a checkpoint from its tensors (key -> TensorInfo) and header
    metadata; inconsistent bookkeeping is refused, naming the tensor."""
    if QUANT_METADATA in metadata:
        return _comfy_quant(path, tensors, metadata[QUANT_METADATA])
    markers = [k for k in tensors if is_marker(k)]
    legacy = [k for k in tensors if k.endswith(".scale_weight")]
    if markers or legacy:
        return _scaled_fp8(path, tensors, markers, legacy)
    configs = [k for k in tensors if k.endswith(CONFIG_SUFFIX)]
    if configs:
        return _comfy_configs(path, tensors, configs)
    scales = {
        w: w.removesuffix(".weight") + ".weight_scale"
        for w, info in tensors.items()
        if w.endswith(".weight")
        and is_fp8(info.dtype)
        and w.removesuffix(".weight") + ".weight_scale" in tensors
    }
    if not scales:
        return Fp8Layout()
    return _layout(path, tensors, "lightx2v", scales, _inputs(tensors, ".input_scale"), {})


def _inputs(tensors: dict, suffix: str) -> dict[str, str]:
    """Activation scales: they scale a layer's input, never its weight."""
    why = "activation scale (does not change the weight)"
    return {k: why for k in tensors if k.endswith(suffix)}


def _scaled_fp8(path: str, tensors: dict, markers: list[str], legacy: list[str]) -> Fp8Layout:
    if not markers:
        raise CheckpointFormatError(
            "has .scale_weight tensors but no 'scaled_fp8' marker, so ComfyUI would load its fp8 "
            "weights unscaled",
            path=path,
            key=legacy[0],
            hint="add the scaled_fp8 marker (an empty float8_e4m3fn tensor) or drop the scales",
        )
    if not legacy:
        raise CheckpointFormatError(
            "has the 'scaled_fp8' marker but no <layer>.scale_weight tensors",
            path=path,
            key=markers[0],
            hint="a scaled-fp8 checkpoint stores one scale per fp8 weight; re-save it",
        )
    scales = {k.removesuffix(".scale_weight") + ".weight": k for k in legacy}
    companions = {m: "scaled-fp8 marker (bookkeeping, not a weight)" for m in markers}
    inputs = _inputs(tensors, ".scale_input")
    return _layout(path, tensors, "scaled_fp8", scales, {**companions, **inputs}, {})


def _comfy_configs(path: str, tensors: dict, configs: list[str]) -> Fp8Layout:
    """ComfyUI's per-layer ``.comfy_quant`` tensors without header metadata: their contents
    are not read (planning reads headers only), so each layer must hold an fp8 weight and its
    ``.weight_scale``, as with the metadata."""
    layers = [k.removesuffix(CONFIG_SUFFIX) for k in configs]
    scales = {layer + ".weight": layer + ".weight_scale" for layer in layers}
    companions = {k: CONFIG_WHY for k in configs}
    inputs = _inputs(tensors, ".input_scale")
    return _layout(path, tensors, "comfy_quant", scales, {**companions, **inputs}, {})


def join_metadata(path: str, headers: list[dict[str, str]]) -> dict[str, str]:
    """The header metadata of a checkpoint's files together. Shards may each list only their
    own layers in ``_quantization_metadata``: those lists are joined, so no shard's scales are
    lost; a layer given two different configs is refused."""
    joined: dict[str, str] = {}
    for header in headers:
        joined.update(header)
    texts = list(dict.fromkeys(h[QUANT_METADATA] for h in headers if QUANT_METADATA in h))
    if len(texts) < 2:
        return joined
    layers: dict[str, dict] = {}
    for text in texts:
        for layer, conf in _layers(path, text).items():
            if layers.setdefault(layer, conf) != conf:
                raise CheckpointFormatError(
                    f"{QUANT_METADATA} differs between shards for layer {layer!r}",
                    path=path,
                    hint="re-save the checkpoint with ComfyUI",
                )
    first = json.loads(texts[0])  # its other fields (format_version)
    joined[QUANT_METADATA] = json.dumps({**first, "layers": dict(sorted(layers.items()))})
    return joined


def _layers(path: str, text: str) -> dict[str, dict]:
    """The ``layers`` of ``_quantization_metadata`` text; malformed text is refused."""
    try:
        layers = json.loads(text)["layers"]
        if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CheckpointFormatError(
            f"__metadata__ {QUANT_METADATA!r} is not a JSON object with a 'layers' object of "
            "per-layer objects",
            path=path,
            hint="re-save the checkpoint with ComfyUI",
        ) from None
    return layers


def _comfy_quant(path: str, tensors: dict, text: str) -> Fp8Layout:
    layers = _layers(path, text)
    scales, companions = {}, {}
    for layer, conf in layers.items():
        fmt = conf.get("format")
        if fmt not in FP8_FORMATS:
            raise CheckpointFormatError(
                f"{QUANT_METADATA} gives layer {layer!r} the format {fmt!r}; loraforge reads "
                f"{', '.join(FP8_FORMATS)}",
                path=path,
                key=layer + ".weight",
                hint="dequantize the checkpoint first (e.g. save it from ComfyUI in bf16)",
            )
        scales[layer + ".weight"] = layer + ".weight_scale"
        companions[layer + CONFIG_SUFFIX] = CONFIG_WHY
    inputs = _inputs(tensors, ".input_scale")
    present = {k: v for k, v in {**companions, **inputs}.items() if k in tensors}
    return _layout(path, tensors, "comfy_quant", scales, present, {QUANT_METADATA: text})


def _layout(
    path: str, tensors: dict, convention: str, scales: dict, companions: dict, metadata: dict
) -> Fp8Layout:
    """Check every weight/scale pair and return the layout."""
    for weight_key, scale_key in scales.items():
        weight, scale = tensors.get(weight_key), tensors.get(scale_key)
        if weight is None:
            raise CheckpointFormatError(
                f"scale {scale_key!r} has no weight {weight_key!r} to scale",
                path=path,
                key=scale_key,
                hint="the checkpoint is incomplete; re-save it",
            )
        if scale is None:
            raise CheckpointFormatError(
                f"fp8 weight listed as quantized has no scale {scale_key!r}",
                path=path,
                key=weight_key,
                hint="the checkpoint is incomplete; re-save it",
            )
        if not is_fp8(weight.dtype):
            raise CheckpointFormatError(
                f"has a scale {scale_key!r} but is stored as {weight.dtype}, not fp8",
                path=path,
                key=weight_key,
                hint="only fp8 weights carry scales; re-save the checkpoint",
            )
        check_scale(path, scale, weight.shape)
        companions[scale_key] = f"fp8 scale of {weight_key} (applied when reading it)"
    return Fp8Layout(convention, dict(sorted(scales.items())), companions, metadata)


def check_scale(path: str, scale, shape: tuple[int, ...]) -> None:
    """A scale must be a float holding one value, or one per row (``[rows]`` / ``[rows, 1]``)."""
    rows = shape[0] if shape else 1
    count = math.prod(scale.shape)
    per_row = len(shape) >= 1 and tuple(scale.shape) in ((rows,), (rows, 1))
    if scale.dtype not in FLOAT_CODES or is_fp8(scale.dtype):
        problem = f"is stored as {scale.dtype}, not a float32/16 scale"
    elif count == 1 or per_row:
        return
    else:
        problem = (
            f"has shape {list(scale.shape)}, which is neither one value nor one per row of "
            f"the weight {list(shape)}"
        )
    raise CheckpointFormatError(
        problem, path=path, key=scale.key, hint="the checkpoint's scales are malformed; re-save it"
    )
