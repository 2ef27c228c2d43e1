"""Extraction benchmark: loraforge against a LightX2V-style baseline, side by side, same run.

Generates (or reuses) a Wan2.1-T2V-1.3B-shaped bf16 pair, then measures wall time and peak RSS
of the whole process tree for

- ``loraforge extract`` (randomized SVD, streaming), and
- ``benchmarks/baseline_extract.py``: both models loaded in fp32, ``torch.linalg.svd`` per
  tensor, as LightX2V's ``tools/extract/lora_extractor.py`` does,

and the ratio of loraforge's rank-r error to the optimal rank-r error (from the baseline's full
SVDs) on every low-rank tensor.

    python benchmarks/extract.py /tmp/wan30 [--rank 32] [--blocks 30] [--skip-baseline]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from measure import format_table, run_measured  # noqa: E402
from wan_shapes import generate_pair  # noqa: E402


def ensure_pair(outdir: str, blocks: int) -> tuple[str, str]:
    base, tuned = os.path.join(outdir, "base"), os.path.join(outdir, "finetuned")
    index = "diffusion_pytorch_model.safetensors.index.json"
    if os.path.exists(os.path.join(base, index)) and os.path.exists(os.path.join(tuned, index)):
        return base, tuned
    return generate_pair(outdir, blocks=blocks, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="pair lives in WORKDIR/base, WORKDIR/finetuned")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-baseline", action="store_true")
    args = parser.parse_args(argv)

    base, tuned = ensure_pair(args.workdir, args.blocks)
    out = os.path.join(args.workdir, "results")
    os.makedirs(out, exist_ok=True)
    ours_out = os.path.join(out, "loraforge.safetensors")
    ours = run_measured(
        [
            "loraforge",
            "extract",
            "--source-model",
            base,
            "--target-model",
            tuned,
            "--output",
            ours_out,
            "--rank",
            str(args.rank),
            "--no-resume",
            "--no-keep-work",
            "--quiet",
            "--device",
            args.device,
        ]
    )
    if ours["returncode"]:
        print(ours["stderr"], file=sys.stderr)
        return 1
    with open(os.path.join(out, "loraforge.report.json")) as f:
        report = json.load(f)
    rows = [
        {
            "tool": "loraforge extract",
            "wall_s": round(ours["wall_s"], 1),
            "peak_rss_gib": round(ours["peak_rss_bytes"] / 2**30, 2),
        }
    ]
    if not args.skip_baseline:
        base_out = os.path.join(out, "baseline.safetensors")
        baseline = run_measured(
            [
                sys.executable,
                os.path.join(HERE, "baseline_extract.py"),
                "--source-model",
                base,
                "--target-model",
                tuned,
                "--output",
                base_out,
                "--rank",
                str(args.rank),
                "--device",
                args.device,
            ]
        )
        if baseline["returncode"]:
            print(baseline["stderr"], file=sys.stderr)
            return 1
        with open(base_out + ".errors.json") as f:
            optimal = json.load(f)["errors"]
        ratios = [report["tensors"][k]["kernel_rel_error"] / v for k, v in optimal.items() if v]
        rows.append(
            {
                "tool": "baseline (fp32 in RAM, full SVD)",
                "wall_s": round(baseline["wall_s"], 1),
                "peak_rss_gib": round(baseline["peak_rss_bytes"] / 2**30, 2),
            }
        )
        rows[0]["speedup"] = round(baseline["wall_s"] / ours["wall_s"], 1)
        rows[0]["err_ratio_mean"] = f"{sum(ratios) / len(ratios):.4f}"
        rows[0]["err_ratio_max"] = f"{max(ratios):.4f}"
        rows[0]["lowrank_tensors"] = len(ratios)
    print(
        format_table(
            rows,
            [
                "tool",
                "wall_s",
                "peak_rss_gib",
                "speedup",
                "err_ratio_mean",
                "err_ratio_max",
                "lowrank_tensors",
            ],
        )
    )
    print("loraforge phases (s):", report["summary"]["phase_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
