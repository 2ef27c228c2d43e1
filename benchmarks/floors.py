"""Floors with no loraforge code in them, for the benchmarks to measure loraforge against:

    python benchmarks/floors.py copy SRC DST            # cp -r SRC DST && sync
    python benchmarks/floors.py cast SRC DST --dtype fp16
    python benchmarks/floors.py gemm [--threads N]      # the machine's fp32 GEMM rate

``copy`` is what the operating system takes to duplicate a checkpoint (a merge whose output
keeps the base's dtype can at best match it). ``cast`` is that copy plus the unavoidable cast
pass, done the plainest way: each ``*.safetensors`` file of SRC read through safetensors' own
``safe_open`` one tensor at a time, float tensors cast with ``Tensor.to``, written in order to a
new file with a header planned up front, then fsynced (``--dtype bf16`` on a bf16 model is a
plain streaming copy). ``gemm`` times fp32 ``mm`` on 2048×2048 matrices for ``--seconds`` and
prints GFLOP/s: compute-bound figures scale with it between machines."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
FLOATS = ("F64", "F32", "F16", "BF16")
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def copy(src: str, dst: str) -> None:
    subprocess.run(["cp", "-r", src, dst], check=True)
    subprocess.run(["sync"], check=True)


def cast(src: str, dst: str, dtype: str) -> None:
    import torch
    from safetensors import safe_open

    target = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[DTYPES[dtype]]
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not name.endswith(".safetensors"):
            shutil.copy(path, os.path.join(dst, name))  # the index: the same names
            continue
        with safe_open(path, framework="pt") as f:
            keys = sorted(f.keys())
            header, offset, plan = {}, 0, []
            for key in keys:
                piece = f.get_slice(key)
                code = piece.get_dtype()
                out = DTYPES[dtype] if code in FLOATS else code
                shape = piece.get_shape()
                size = ITEMSIZE[out] * int(torch.Size(shape).numel())
                span = [offset, offset + size]
                header[key] = {"dtype": out, "shape": shape, "data_offsets": span}
                plan.append((key, out != code))
                offset += size
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            with open(os.path.join(dst, name), "wb") as out_file:
                out_file.write(len(raw).to_bytes(8, "little") + raw)
                for key, converts in plan:
                    tensor = f.get_tensor(key)
                    if converts:
                        tensor = tensor.to(target)
                    out_file.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))
                out_file.flush()
                os.fsync(out_file.fileno())


def gemm_rate(threads: int | None, seconds: float) -> float:
    import torch

    if threads:
        torch.set_num_threads(threads)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="floor", required=True)
    for name in ("copy", "cast"):
        p = sub.add_parser(name)
        p.add_argument("src")
        p.add_argument("dst")
        if name == "cast":
            p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p = sub.add_parser("gemm")
    p.add_argument("--threads", type=int)
    p.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.floor == "copy":
        copy(args.src, args.dst)
    elif args.floor == "cast":
        cast(args.src, args.dst, args.dtype)
    else:
        print(f"{gemm_rate(args.threads, args.seconds):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
