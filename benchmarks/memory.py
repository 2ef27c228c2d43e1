"""Peak memory against tensor size, whole versus blocked (``--max-memory``).

For each row count, a base/fine-tune pair holding one ``rows × cols`` bf16 weight (a rank-8
change plus bf16 rounding) is extracted and the LoRA merged back, twice: with the default
budget (every tensor whole: memory grows with the tensor) and with ``--max-memory`` (tensors
over it run in row blocks: memory stays flat). Each run is a fresh process; peak RSS is the
process's, sampled every 20 ms (benchmarks/measure.py).

    python3 benchmarks/memory.py /tmp/lf-mem --rows 16384,32768,65536,131072 --max-memory 256MiB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import run_measured  # noqa: E402


def make_pair(root: str, rows: int, cols: int) -> tuple[str, str]:
    g = torch.Generator().manual_seed(rows)
    base = (torch.randn(rows, cols, generator=g) * 0.02).bfloat16()
    delta = torch.randn(rows, 8, generator=g) @ torch.randn(8, cols, generator=g) * 0.01
    tuned = (base.float() + delta).bfloat16()
    paths = os.path.join(root, "base.safetensors"), os.path.join(root, "tuned.safetensors")
    for path, weight in zip(paths, (base, tuned), strict=True):
        save_file({"embed.weight": weight}, path)
    return paths


def _loraforge(*args: str) -> list[str]:
    return [sys.executable, "-m", "loraforge.pipeline.cli", *args]


def run(root: str, rows: int, cols: int, budget: str | None) -> dict:
    base, tuned = make_pair(root, rows, cols)
    limit = ["--max-memory", budget] if budget else []
    lora, merged = os.path.join(root, "lora.safetensors"), os.path.join(root, "merged.safetensors")
    extract = run_measured(
        _loraforge(
            *("extract", "--quiet", "--source-model", base, "--target-model", tuned),
            *("--output", lora, "--rank", "8", "--workers", "1", "--no-keep-work", *limit),
        )
    )
    merge = run_measured(
        _loraforge(
            *("merge", "--quiet", "--source-model", base, "--lora-model", lora),
            *("--output", merged, "--workers", "1", *limit),
        )
    )
    for result in (extract, merge):
        if result["returncode"] != 0:
            raise SystemExit(result["stderr"])
    with open(os.path.join(root, "lora.report.json")) as f:
        blocked = json.load(f)["summary"]["memory"]["blocked"]
    for name in os.listdir(root):
        path = os.path.join(root, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return {"extract": extract, "merge": merge, "blocked": bool(blocked)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="scratch directory (emptied)")
    parser.add_argument("--rows", default="16384,32768,65536,131072")
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--max-memory", default="256MiB")
    args = parser.parse_args()
    os.makedirs(args.root, exist_ok=True)
    print(
        f"one {args.cols}-column bf16 weight; --workers 1; blocked runs: --max-memory "
        f"{args.max_memory}\n"
    )
    header = (
        f"{'rows':>8} {'fp32 MB':>8} | {'extract whole':>18} {'blocked':>18} | "
        f"{'merge whole':>18} {'blocked':>18}"
    )
    print(header)
    print("-" * len(header))
    for rows in (int(r) for r in args.rows.split(",")):
        whole = run(args.root, rows, args.cols, None)
        blocked = run(args.root, rows, args.cols, args.max_memory)

        def cell(result: dict) -> str:
            return f"{result['wall_s']:6.2f} s {result['peak_rss_bytes'] / 2**20:6.0f} MiB"

        mark = "" if blocked["blocked"] else " (fits: whole)"
        print(
            f"{rows:>8} {4 * rows * args.cols / 1e6:>8.0f} | {cell(whole['extract'])} "
            f"{cell(blocked['extract'])} | {cell(whole['merge'])} {cell(blocked['merge'])}{mark}",
            flush=True,
        )


if __name__ == "__main__":
    main()
