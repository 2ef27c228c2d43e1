"""Time ``loraforge inspect`` on a generated LoRA of about 1 GB: the cost of every delta's norm
from its factors (``‖up·down‖²_F = Σ (upᵀup) ∘ (down·downᵀ)``, fp32 Gram matrices summed in
fp64, O((m+n)r²) per module) side by side with the floor, reading every byte once (page cache
warm), and with forming each product (the dense fp64 norm) on a few modules, scaled to all.

    python benchmarks/inspect_lora.py WORKDIR [--modules 400] [--dim 5120] [--rank 128]

WORKDIR/lora_<modules>x<dim>_r<rank>.safetensors (bf16 factors, an fp32 ``.alpha`` per module,
LightX2V names) is written unless present. Prints the file size, the floor, ``inspect_lora``'s
seconds in this process (wall, and CPU over all threads: a loaded machine inflates the
first) and the CLI's (``--json``, a fresh process) wall seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
from safetensors.torch import save_file

from loraforge.pipeline.inspect.command import inspect_lora
from loraforge.pipeline.io.reader import index_checkpoint, load_tensor


def generate(path: str, modules: int, dim: int, rank: int) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(modules):
        stem = f"diffusion_model.blocks.{i // 10}.m{i % 10}"
        tensors[f"{stem}.lora_up.weight"] = torch.randn(dim, rank, generator=g).bfloat16()
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, dim, generator=g).bfloat16()
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--modules", type=int, default=400)
    parser.add_argument("--dim", type=int, default=5120)
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    path = os.path.join(args.workdir, f"lora_{args.modules}x{args.dim}_r{args.rank}.safetensors")
    if not os.path.exists(path):
        generate(path, args.modules, args.dim, args.rank)
    print(f"LoRA {path}: {os.path.getsize(path) / 1e9:.3f} GB, {torch.get_num_threads()} threads")

    index = index_checkpoint(path)
    start = time.perf_counter()
    for info in index.tensors.values():
        load_tensor(info)
    floor = time.perf_counter() - start
    print(f"floor: read every tensor once        {floor:8.2f} s")

    start, cpu = time.perf_counter(), time.process_time()
    report = inspect_lora(path)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"inspect_lora (in process)            {seconds:8.2f} s ({cpu:.2f} s CPU, all threads)")

    start = time.perf_counter()
    cli = [sys.executable, "-m", "loraforge.pipeline.cli", "inspect", path, "--json"]
    subprocess.run(cli, check=True, stdout=subprocess.DEVNULL)
    print(f"loraforge inspect --json (process)   {time.perf_counter() - start:8.2f} s")

    sample = report["modules"][:4]
    tensors = index.tensors
    start = time.perf_counter()
    for m in sample:
        up = load_tensor(tensors[f"{m['module']}.lora_up.weight"], torch.float64)
        down = load_tensor(tensors[f"{m['module']}.lora_down.weight"], torch.float64)
        torch.linalg.matrix_norm(up @ down)
    dense = (time.perf_counter() - start) / len(sample) * len(report["modules"])
    print(f"dense fp64 products (4 timed, scaled) {dense:8.2f} s")


if __name__ == "__main__":
    main()
