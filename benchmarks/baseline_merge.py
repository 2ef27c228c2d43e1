"""Baseline LoRA merge, reproducing LightX2V's ``tools/extract/lora_merger.py``.

Same algorithm and the same memory behaviour: the whole base (every ``*.safetensors`` in a
directory, or one file) and the LoRA are read and converted to fp32 in RAM; each
``diffusion_model.<m>.lora_up.weight``/``lora_down.weight`` pair adds ``alpha * (up @ down)`` to
``<m>.weight``, each ``.diff``/``.diff_b``/``.diff_m`` adds ``alpha * diff`` to
``.weight``/``.bias``/``.modulation`` (mismatched shapes and unknown targets are skipped), and the
whole merged model is saved as one bf16 safetensors file.

    python benchmarks/baseline_merge.py --source-model BASE --lora-model lora.safetensors \
        --output merged.safetensors [--alpha 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PREFIX = "diffusion_model."
UP, DOWN = ".lora_up.weight", ".lora_down.weight"
DIFF_TARGETS = {".diff": ".weight", ".diff_b": ".bias", ".diff_m": ".modulation"}


def load_fp32(path: str) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint (a file, or every ``*.safetensors`` in a directory), then convert
    floating tensors to fp32. Kept in step with ``baseline_extract.load_fp32`` by hand, so each
    baseline stays a standalone script like the LightX2V tool it reproduces."""
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors")
        )
    else:
        files = [path]
    if not files or not all(os.path.isfile(f) for f in files):
        raise FileNotFoundError(f"no safetensors checkpoint at {path}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                weights[key] = f.get_tensor(key)
    return {k: t.float() if t.dtype.is_floating_point else t for k, t in weights.items()}


def _target_key(lora_key: str) -> tuple[str, str] | None:
    """``(base key, kind)`` for a LoRA key, kind in ``up``/``down``/``diff``; None if unknown."""
    name = lora_key.removeprefix(PREFIX)
    if name.endswith(UP):
        return name[: -len(UP)] + ".weight", "up"
    if name.endswith(DOWN):
        return name[: -len(DOWN)] + ".weight", "down"
    for suffix, target in DIFF_TARGETS.items():
        if name.endswith(suffix):
            return name[: -len(suffix)] + target, "diff"
    return None


def merge(
    source: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], alpha: float
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Merged fp32 weights (a new dict; ``source`` is left intact) and counts per outcome."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    diffs: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(("lowrank", "diff", "skipped"), 0)
    for key, tensor in lora.items():
        found = _target_key(key)
        if found is None:
            counts["skipped"] += 1
        elif found[1] == "diff":
            diffs[found[0]] = tensor
        else:
            pairs.setdefault(found[0], {})[found[1]] = tensor

    merged = dict(source)
    for key, pair in pairs.items():
        if key not in source or pair.keys() != {"up", "down"}:
            counts["skipped"] += 1
            continue
        up, down = pair["up"], pair["down"]
        if source[key].shape != (up.shape[0], down.shape[1]):
            counts["skipped"] += 1
            continue
        merged[key] = source[key] + alpha * (up @ down)
        counts["lowrank"] += 1
    for key, diff in diffs.items():
        if key not in source or source[key].shape != diff.shape:
            counts["skipped"] += 1
            continue
        merged[key] = source[key] + alpha * diff
        counts["diff"] += 1
    return merged, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source-model", required=True, help="base: file or shard directory")
    parser.add_argument("--lora-model", required=True, help="LoRA .safetensors")
    parser.add_argument("--output", required=True, help="merged .safetensors to write")
    parser.add_argument("--alpha", type=float, default=1.0, help="LoRA strength")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    source = load_fp32(args.source_model)
    lora = load_fp32(args.lora_model)
    loaded = time.perf_counter()
    merged, counts = merge(source, lora, args.alpha)
    done_merge = time.perf_counter()
    save_file({k: t.to(torch.bfloat16).contiguous() for k, t in merged.items()}, args.output)
    done = time.perf_counter()
    print(
        json.dumps(
            {
                **counts,
                "tensors_written": len(merged),
                "load_s": round(loaded - start, 2),
                "merge_s": round(done_merge - loaded, 2),
                "save_s": round(done - done_merge, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
