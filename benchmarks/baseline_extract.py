"""Baseline LoRA extraction, reproducing LightX2V's ``tools/extract/lora_extractor.py``.

Same algorithm and the same memory behaviour: both models are read completely (every
``*.safetensors`` in a directory, or one file) and converted to fp32 in RAM; for each common key
of equal shape ``diff = target - source`` is skipped when allclose to 0 (atol 1e-8), stored whole
for 1-D or < 1e6-element tensors (``.weight``/``.bias``/``.modulation`` become
``.diff``/``.diff_b``/``.diff_m``, other names are skipped), and otherwise, for 2-D ``.weight``
tensors, factored by a full ``torch.linalg.svd`` into ``lora_up = U_r sqrt(S_r)`` and
``lora_down = sqrt(S_r) Vh_r`` (other large tensors count as failed). Output: bf16 safetensors.

Beside the output, ``<output>.errors.json`` holds, per low-rank tensor, the optimal rank-r
relative Frobenius error ``sqrt(sum(S[r:]^2) / sum(S^2))`` (sums in fp64): the yardstick for
loraforge's randomized SVD.

    python benchmarks/baseline_extract.py --source-model BASE --target-model TUNED \
        --output lora.safetensors [--rank 32]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PREFIX = "diffusion_model."
LOWRANK_MIN_NUMEL = 1_000_000
DIFF_SUFFIXES = {".weight": ".diff", ".bias": ".diff_b", ".modulation": ".diff_m"}


def safetensors_files(path: str) -> list[str]:
    """One file, or every ``*.safetensors`` in a directory (sorted; an index is not consulted)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not names:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        return [os.path.join(path, n) for n in names]
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    return [path]


def load_fp32(path: str) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint, then convert floating tensors to fp32 (as LightX2V does)."""
    weights: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                weights[key] = f.get_tensor(key)
    return {k: t.float() if t.dtype.is_floating_point else t for k, t in weights.items()}


def diff_key(key: str) -> str | None:
    """``diffusion_model.<key>`` with its suffix mapped to a diff suffix, or None to skip."""
    for suffix, new in DIFF_SUFFIXES.items():
        if key.endswith(suffix):
            return PREFIX + key[: -len(suffix)] + new
    return None


def decompose(
    diff: torch.Tensor, rank: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD on ``device``: ``(lora_up, lora_down, optimal relative Frobenius error)``.

    Up and down come back on the CPU in ``diff``'s dtype.
    """
    u, s, vh = torch.linalg.svd(diff.to(device), full_matrices=False)
    r = min(rank, s.numel())
    energy = s.double().square()
    error = math.sqrt(energy[r:].sum().item() / energy.sum().item())
    root = s[:r].sqrt()
    up = (u[:, :r] * root).to("cpu", diff.dtype).contiguous()
    down = (root.unsqueeze(1) * vh[:r]).to("cpu", diff.dtype).contiguous()
    return up, down, error


def extract(
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    rank: int,
    device: str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, int]]:
    """LoRA tensors (fp32), optimal errors per low-rank key and counts per outcome."""
    lora: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    counts = dict.fromkeys(("lowrank", "diff", "unchanged", "skipped", "failed"), 0)
    for key in sorted(source.keys() & target.keys()):
        src, tgt = source[key], target[key]
        if src.shape != tgt.shape:
            counts["skipped"] += 1
            continue
        diff = tgt.to(src.dtype) - src
        if torch.allclose(diff, torch.zeros_like(diff), atol=1e-8):
            counts["unchanged"] += 1
            continue
        if src.dim() == 1 or src.numel() < LOWRANK_MIN_NUMEL:
            name = diff_key(key)
            if name is None:
                counts["skipped"] += 1
                continue
            lora[name] = diff
            counts["diff"] += 1
        elif src.dim() == 2 and key.endswith(".weight"):
            base = PREFIX + key[: -len(".weight")]
            up, down, errors[key] = decompose(diff, rank, device)
            lora[base + ".lora_up.weight"] = up
            lora[base + ".lora_down.weight"] = down
            counts["lowrank"] += 1
        else:
            print(f"error: {key} is not a 2-D weight; not extracted", file=sys.stderr)
            counts["failed"] += 1
    return lora, errors, counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source-model", required=True, help="base: file or shard directory")
    parser.add_argument("--target-model", required=True, help="fine-tuned: file or directory")
    parser.add_argument("--output", required=True, help="LoRA .safetensors to write")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument(
        "--device", default=None, help="SVD device (default: cuda if available, as LightX2V)"
    )
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    start = time.perf_counter()
    source = load_fp32(args.source_model)
    target = load_fp32(args.target_model)
    loaded = time.perf_counter()
    lora, errors, counts = extract(source, target, args.rank, device)
    extracted = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file({k: t.to(torch.bfloat16).contiguous() for k, t in lora.items()}, args.output)
    with open(args.output + ".errors.json", "w") as f:
        json.dump({"rank": args.rank, "metric": "optimal_relative_frobenius", "errors": errors}, f)
        f.write("\n")
    done = time.perf_counter()
    print(
        json.dumps(
            {
                **counts,
                "device": device,
                "tensors_written": len(lora),
                "load_s": round(loaded - start, 2),
                "extract_s": round(extracted - loaded, 2),
                "save_s": round(done - extracted, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
