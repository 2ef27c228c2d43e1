"""Small helpers of ``benchmarks/gpu_check.sh``: each subcommand prints one result line (the
check's figures) and exits 0 when the check holds, 1 when it does not.

    python benchmarks/gpu_compare.py inventory
    python benchmarks/gpu_compare.py pair OUTDIR [--blocks 2]
    python benchmarks/gpu_compare.py big-pair OUTDIR [--count 3]   # 5120x13824 bf16 tensors
    python benchmarks/gpu_compare.py extract-errors CPU.safetensors CUDA.safetensors
    python benchmarks/gpu_compare.py same-bytes A.safetensors B.safetensors ...
    python benchmarks/gpu_compare.py bf16-steps CPU.safetensors CUDA.safetensors
    python benchmarks/gpu_compare.py memory PAIRDIR OUTDIR [--device cuda]
    python benchmarks/gpu_compare.py bench-ratio CPU.report.json CUDA.report.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import os
import resource
import sys
import threading
import time

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

BIG_SHAPE = (5120, 13824)  # Wan2.1-14B's FFN weight


def inventory(args) -> int:
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(f"cuda:{i} {p.name} {p.total_memory / 2**30:.1f} GiB")
    print(
        f"ok: torch {torch.__version__}, cuda {torch.version.cuda}, "
        f"{torch.cuda.device_count()} GPUs: {'; '.join(gpus) or 'none'}"
    )
    names = ("dask", "distributed", "dask-cuda", "zarr", "numcodecs", "typer", "rich")
    versions = []
    for name in names + ("safetensors", "google-crc32c", "psutil"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} MISSING")
    print("ok: " + ", ".join(versions))
    import loraforge.pipeline.cli as cli

    print("loraforge imports from", os.path.dirname(cli.__file__))
    return 0


def pair(args) -> int:
    from wan_shapes import generate_pair

    base, tuned = generate_pair(args.outdir, args.blocks, overwrite=True)
    print(f"pair: {args.blocks} Wan2.1-1.3B blocks in {args.outdir}")
    return 0


def big_pair(args) -> int:
    """``count`` base tensors of BIG_SHAPE in bf16 and targets = base + rank-16 + small noise."""
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for i in range(args.count):
        w = torch.randn(BIG_SHAPE, generator=g) * 0.02
        up = torch.randn(BIG_SHAPE[0], 16, generator=g) * 0.01
        down = torch.randn(16, BIG_SHAPE[1], generator=g) * 0.01
        noise = torch.randn(BIG_SHAPE, generator=g) * 1e-4
        key = f"blocks.{i}.ffn.0.weight"
        base[key] = w.to(torch.bfloat16)
        tuned[key] = (w + up @ down + noise).to(torch.bfloat16)
    for name, tensors in (("base", base), ("finetuned", tuned)):
        os.makedirs(os.path.join(args.outdir, name), exist_ok=True)
        save_file(tensors, os.path.join(args.outdir, name, "model.safetensors"))
    nbytes = BIG_SHAPE[0] * BIG_SHAPE[1] * 2
    print(f"big pair: {args.count} tensors of {BIG_SHAPE} bf16 ({nbytes / 2**20:.1f} MiB each)")
    return 0


def _file_bytes_diff(a: str, b: str) -> tuple[int, int]:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        x, y = fa.read(), fb.read()
    n = min(len(x), len(y))
    xa = torch.frombuffer(bytearray(x[:n]), dtype=torch.uint8)
    ya = torch.frombuffer(bytearray(y[:n]), dtype=torch.uint8)
    return int((xa != ya).sum()) + abs(len(x) - len(y)), max(len(x), len(y))


def extract_errors(args) -> int:
    """CPU vs CUDA extraction of one pair: each LoRA's rank-r error (from the reports) and how
    far the two low-rank products are apart, against the tolerance; the byte difference."""
    cpu, cuda = load_file(args.cpu), load_file(args.cuda)
    reports = [json.load(open(p.rsplit(".", 1)[0] + ".report.json")) for p in (args.cpu, args.cuda)]
    rel = [{k: e.get("rel_error") for k, e in r["tensors"].items()} for r in reports]
    ups = [k[: -len(".lora_up.weight")] for k in cpu if k.endswith(".lora_up.weight")]
    ratios, product_gaps, failures = [], [], []
    for key, err_cpu in rel[0].items():
        err_cuda = rel[1].get(key)
        if err_cpu is None or err_cuda is None or err_cpu < 1e-6:
            continue
        ratios.append(err_cuda / err_cpu)
        stem = key[: -len(".weight")] if key.endswith(".weight") else key
        named = [u for u in ups if u == stem or u.endswith("." + stem)]  # naming adds a prefix
        up, down = (
            (f"{named[0]}.lora_up.weight", f"{named[0]}.lora_down.weight") if named else ("", "")
        )
        if up in cpu and up in cuda:
            p_cpu = cpu[up].float() @ cpu[down].float()
            p_cuda = cuda[up].float() @ cuda[down].float()
            gap = float((p_cpu - p_cuda).norm() / p_cpu.norm().clamp_min(1e-30))
            product_gaps.append(gap)
            # two near-optimal rank-r fits of one delta differ by at most about both errors
            if gap > 2.5 * max(err_cpu, err_cuda) + 1e-3:
                failures.append(key)
        if err_cuda > err_cpu * 1.02 + 1e-4:
            failures.append(key)
    same = sum(1 for k in cpu if k in cuda and torch.equal(cpu[k], cuda[k]))
    diff, total = _file_bytes_diff(args.cpu, args.cuda)
    ok = bool(ratios) and not failures and cpu.keys() == cuda.keys()
    gap = f"{max(product_gaps):.2e}" if product_gaps else "n/a"
    print(
        f"{'ok' if ok else 'FAIL'}: {len(ratios)} low-rank tensors, rank-r error cuda/cpu "
        f"max {max(ratios, default=0):.4f} mean {sum(ratios) / max(len(ratios), 1):.4f}, "
        f"product gap max {gap}; {same}/{len(cpu)} tensors byte-identical, {diff} of {total} "
        f"bytes differ ({100 * diff / max(total, 1):.2f}%)"
        + (f"; out of tolerance: {', '.join(sorted(set(failures))[:5])}" if failures else "")
    )
    return 0 if ok else 1


def same_bytes(args) -> int:
    digests = []
    for path in args.files:
        with open(path, "rb") as f:
            digests.append(hashlib.sha256(f.read()).hexdigest()[:16])
    ok = len(set(digests)) == 1
    names = ", ".join(
        f"{os.path.basename(os.path.dirname(p))}={d}"
        for p, d in zip(args.files, digests, strict=True)
    )
    print(f"{'ok: identical bytes' if ok else 'FAIL: bytes differ'} ({names})")
    return 0 if ok else 1


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """bf16 bit patterns as integers ordered like the values (one step apart = adjacent)."""
    bits = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -32768 - bits, bits)


def bf16_steps(args) -> int:
    a, b = load_file(args.cpu), load_file(args.cuda)
    over, same, total, worst = 0, 0, 0, 0
    for key in a:
        x, y = a[key], b[key]
        if x.dtype != torch.bfloat16:
            x, y = x.float(), y.float()
            same += int((x == y).sum())
            total += x.numel()
            continue
        steps = (_ordered(x) - _ordered(y)).abs()
        over += int((steps > 1).sum())
        same += int((steps == 0).sum())
        worst = max(worst, int(steps.max()) if steps.numel() else 0)
        total += x.numel()
    ok = a.keys() == b.keys() and over == 0
    print(
        f"{'ok' if ok else 'FAIL'}: {total} elements, {over} more than one bf16 step apart, "
        f"{total - same} differ at all, largest gap {worst} steps"
    )
    return 0 if ok else 1


def memory(args) -> int:
    """Extract the big pair in this process (two threads on cuda) and report peak GPU memory,
    pinned host memory and peak RSS against the plan's figure."""
    import typer
    from click.testing import CliRunner

    from loraforge.pipeline.cli import app

    peak_rss = [0]
    stop = threading.Event()

    def sample():
        import psutil

        proc = psutil.Process()
        while not stop.is_set():
            peak_rss[0] = max(peak_rss[0], proc.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = os.path.join(args.outdir, f"big-{args.device}.safetensors")
    started = time.perf_counter()
    result = CliRunner().invoke(
        typer.main.get_command(app),
        [
            "extract",
            "--source-model",
            os.path.join(args.pair, "base"),
            "--target-model",
            os.path.join(args.pair, "finetuned"),
            "--output",
            out,
            "--rank",
            "32",
            "--device",
            args.device,
            "--no-resume",
            "--quiet",
            "--workers",
            "2",
        ],
    )
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if result.exit_code:
        print(f"FAIL: extract exit {result.exit_code}: {result.output.strip()[-300:]}")
        return 1
    tensor = BIG_SHAPE[0] * BIG_SHAPE[1] * 2
    planned = 2 * 2 * tensor  # 2 threads x (source + target) in the stored dtype
    parts = [
        f"{seconds:.1f} s",
        f"peak RSS {peak_rss[0] / 2**30:.2f} GiB",
        f"ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB",
    ]
    if cuda:
        parts.append(f"GPU peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        parts.append(f"reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB")
        try:
            stats = torch.cuda.host_memory_stats()
            pinned = {
                k: v for k, v in stats.items() if "bytes" in k and ("peak" in k or "current" in k)
            }
            parts.append(
                "pinned " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in pinned.items())
            )
        except Exception as e:  # noqa: BLE001 - older torch: say so
            parts.append(f"pinned stats unavailable ({type(e).__name__})")
    parts.append(f"planned staging 4x tensor = {planned / 2**30:.2f} GiB")
    print("ok: " + ", ".join(parts))
    return 0


def bench_ratio(args) -> int:
    cpu, cuda = (json.load(open(p))["summary"] for p in (args.cpu, args.cuda))
    wall = cpu["seconds"] / max(cuda["seconds"], 1e-9)
    compute = cpu["phase_seconds"]["compute"] / max(cuda["phase_seconds"]["compute"], 1e-9)
    print(
        f"ok: cpu {cpu['seconds']:.1f} s (compute {cpu['phase_seconds']['compute']:.1f} s), "
        f"cuda {cuda['seconds']:.1f} s (compute {cuda['phase_seconds']['compute']:.1f} s): "
        f"cuda is {wall:.2f}x faster overall, {compute:.2f}x in compute"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("inventory").set_defaults(fn=inventory)
    p = sub.add_parser("pair")
    p.add_argument("outdir")
    p.add_argument("--blocks", type=int, default=2)
    p.set_defaults(fn=pair)
    p = sub.add_parser("big-pair")
    p.add_argument("outdir")
    p.add_argument("--count", type=int, default=3)
    p.set_defaults(fn=big_pair)
    for name, fn in (("extract-errors", extract_errors), ("bf16-steps", bf16_steps)):
        p = sub.add_parser(name)
        p.add_argument("cpu")
        p.add_argument("cuda")
        p.set_defaults(fn=fn)
    p = sub.add_parser("same-bytes")
    p.add_argument("files", nargs="+")
    p.set_defaults(fn=same_bytes)
    p = sub.add_parser("memory")
    p.add_argument("pair")
    p.add_argument("outdir")
    p.add_argument("--device", default="cuda")
    p.set_defaults(fn=memory)
    p = sub.add_parser("bench-ratio")
    p.add_argument("cpu")
    p.add_argument("cuda")
    p.set_defaults(fn=bench_ratio)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
