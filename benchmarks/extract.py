"""Extraction benchmark: ``loraforge extract`` against LightX2V's own extractor, side by side in
one run, on a Wan2.1-T2V-1.3B-shaped bf16 pair (generated unless present):

- ``loraforge extract`` with a warm page cache, and cold (the page cache dropped first, which
  needs root: ``/proc/sys/vm/drop_caches``);
- LightX2V's ``tools/extract/lora_extractor.py`` when ``--lightx2v DIR`` points at a copy of
  LightX2V (never copied into this repository), warm;
- ``benchmarks/baseline_extract.py`` (LightX2V's method, full SVD per tensor) for the optimal
  rank-r errors, unless ``--skip-errors``: loraforge's error over the optimal, per low-rank
  tensor (mean and max);
- and the machine's fp32 GEMM rate (``floors.py gemm``), printed with the figures, with a line
  where the machine is a VM that reports freed memory to its host (``measure.py
  free_page_reporting``), which slows the cold run.

    python benchmarks/extract.py WORKDIR [--lightx2v DIR] [--rank 32] [--skip-errors]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from measure import (  # noqa: E402
    format_table,
    free_page_reporting,
    gemm_rate,
    loraforge_program,
    run_measured,
    warm,
)
from wan_shapes import generate_pair  # noqa: E402

INDEX = "diffusion_pytorch_model.safetensors.index.json"


def ensure_pair(workdir: str, blocks: int) -> tuple[str, str]:
    base, tuned = os.path.join(workdir, "base"), os.path.join(workdir, "finetuned")
    if all(os.path.exists(os.path.join(d, INDEX)) for d in (base, tuned)):
        return base, tuned
    return generate_pair(workdir, blocks=blocks, overwrite=True)


def drop_caches() -> bool:
    """Empty the page cache (root only); False where the kernel refuses."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):  # not root, or sync failed
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="the pair lives in WORKDIR/base, WORKDIR/finetuned")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lightx2v", metavar="DIR", help="a copy of LightX2V (its repo root)")
    parser.add_argument("--skip-errors", action="store_true", help="no full-SVD error check")
    args = parser.parse_args(argv)

    base, tuned = ensure_pair(args.workdir, args.blocks)
    out = os.path.join(args.workdir, "results")
    os.makedirs(out, exist_ok=True)
    ours = os.path.join(out, "loraforge.safetensors")
    extract = [loraforge_program(), "extract", "--source-model", base, "--target-model", tuned,
               "--output", ours, "--rank", str(args.rank), "--no-resume", "--no-keep-work",
               "--quiet", "--device", args.device]  # fmt: skip
    rate = gemm_rate()
    runs = [("loraforge extract, warm", extract, "warm")]
    if drop_caches():
        runs.append(("loraforge extract, cold", extract, "cold"))
    if args.lightx2v:
        script = os.path.join(args.lightx2v, "tools", "extract", "lora_extractor.py")
        theirs = os.path.join(out, "lightx2v.safetensors")
        cmd = [sys.executable, script, "--source-model", base, "--target-model", tuned,
               "--output", theirs, "--rank", str(args.rank)]  # fmt: skip
        runs.append(("LightX2V lora_extractor.py, warm", cmd, "warm"))
    rows = []
    for label, cmd, cache in runs:
        if cache == "cold":
            drop_caches()
        else:
            warm(base, tuned)
        result = run_measured(cmd)
        if result["returncode"]:
            print(result["stderr"][-2000:], file=sys.stderr)
            return 1
        rows.append({"tool": label, "wall_s": round(result["wall_s"], 1),
                     "peak_rss_gib": round(result["peak_rss_bytes"] / 2**30, 2)})  # fmt: skip
        print(f"  {label}: {result['wall_s']:.1f} s", flush=True)
    lightx2v = next((r for r in rows if r["tool"].startswith("LightX2V")), None)
    for row in rows:
        if lightx2v and row is not lightx2v:
            row["x_lightx2v_warm"] = round(lightx2v["wall_s"] / row["wall_s"], 1)
    with open(os.path.join(out, "loraforge.report.json")) as f:
        report = json.load(f)
    if not args.skip_errors:
        errors = os.path.join(out, "baseline.safetensors")
        baseline = run_measured([sys.executable, os.path.join(HERE, "baseline_extract.py"),
                                 "--source-model", base, "--target-model", tuned, "--output",
                                 errors, "--rank", str(args.rank)])  # fmt: skip
        if baseline["returncode"]:
            print(baseline["stderr"], file=sys.stderr)
            return 1
        with open(errors + ".errors.json") as f:
            optimal = json.load(f)["errors"]
        ratios = [report["tensors"][k]["kernel_rel_error"] / v for k, v in optimal.items() if v]
        rows[0]["err_ratio_mean"] = f"{sum(ratios) / len(ratios):.4f}"
        rows[0]["err_ratio_max"] = f"{max(ratios):.4f}"
        rows[0]["lowrank_tensors"] = len(ratios)
    print(
        f"\nrank-{args.rank} extraction from {base} and {tuned}; fp32 GEMM {rate:.1f} GFLOP/s "
        "here; x_lightx2v_warm: LightX2V's warm wall time over the row's, cold rows included"
    )
    if free_page_reporting():
        print(
            "this VM reports freed memory to its host: the cold run's page cache (the memory"
            " drop_caches freed) costs a host fault per page, so it is slower than on a"
            " machine that keeps its memory (docs/benchmarks.md)"
        )
    print()
    columns = ["tool", "wall_s", "peak_rss_gib", "x_lightx2v_warm", "err_ratio_mean"]
    print(format_table(rows, [*columns, "err_ratio_max", "lowrank_tensors"]))
    print("loraforge phases (s, warm run's report is overwritten by the cold one):",
          report["summary"]["phase_seconds"])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
