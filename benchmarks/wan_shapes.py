"""Synthetic Wan2.1-T2V-1.3B-shaped checkpoint pairs (base, fine-tuned) for benchmarks.

Both checkpoints are bf16 Hugging Face shard directories (``diffusion_pytorch_model-0000i-of-
0000N.safetensors`` + ``diffusion_pytorch_model.safetensors.index.json``). Every tensor is drawn
from its own generator seeded from ``(seed, role, key)``, so a tensor's values do not depend on
``--blocks`` or on generation order, and the pair is streamed tensor by tensor: peak memory is a
few of the largest tensors, never a model.

Fine-tuned = base + delta. For 2-D weights with >= 1e6 elements the delta is a rank-16 spike
(most of the energy) plus a full-rank tail ``G1 @ diag(i**-0.5) @ G2`` carrying
``TAIL_FRACTION`` of the delta's Frobenius norm, the hard case for randomized SVD. Other tensors
get a small dense delta; every ``norm_q``/``norm_k`` weight is left unchanged.

    python benchmarks/wan_shapes.py OUTDIR [--blocks 30] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

DIM = 1536
FFN_DIM = 8960
TEXT_DIM = 4096
FREQ_DIM = 256
IN_CHANNELS = 16
OUT_CHANNELS = 16
PATCH = (1, 2, 2)
DEFAULT_BLOCKS = 30

FILE_PREFIX = "diffusion_pytorch_model"
MAX_SHARD_BYTES = 2_000_000_000  # huggingface_hub's "2GB"
DTYPE = torch.bfloat16
DTYPE_CODE = "BF16"

BASE_STD = 0.02
NORM_JITTER = 0.02  # norm weights are 1 + N(0, NORM_JITTER)
LOWRANK_MIN_NUMEL = 1_000_000  # same threshold as LightX2V's extractor
SPIKE_RANK = 16
SPIKE_DECAY = 0.9  # singular value j of the spike part ~ SPIKE_DECAY**j
TAIL_EXPONENT = 0.5  # tail singular values ~ i**-TAIL_EXPONENT before mixing
TAIL_FRACTION = 0.3  # ||tail||_F / ||delta||_F
DELTA_RMS = 1e-3  # RMS of every delta on 0.02-scale tensors
NORM_DELTA_RMS = 1e-2  # norm weights sit near 1 where a bf16 step is ~0.004-0.008
PENDING_WRITES = 4  # tensors queued for the writer thread, per checkpoint

Progress = Callable[[int, int, str], None]


def wan_tensor_specs(blocks: int = DEFAULT_BLOCKS) -> list[tuple[str, tuple[int, ...]]]:
    """Key and shape of every tensor of a Wan2.1 1.3B DiT, in ``state_dict`` order."""
    specs: list[tuple[str, tuple[int, ...]]] = [
        ("patch_embedding.weight", (DIM, IN_CHANNELS, *PATCH)),
        ("patch_embedding.bias", (DIM,)),
        ("text_embedding.0.weight", (DIM, TEXT_DIM)),
        ("text_embedding.0.bias", (DIM,)),
        ("text_embedding.2.weight", (DIM, DIM)),
        ("text_embedding.2.bias", (DIM,)),
        ("time_embedding.0.weight", (DIM, FREQ_DIM)),
        ("time_embedding.0.bias", (DIM,)),
        ("time_embedding.2.weight", (DIM, DIM)),
        ("time_embedding.2.bias", (DIM,)),
        ("time_projection.1.weight", (6 * DIM, DIM)),
        ("time_projection.1.bias", (6 * DIM,)),
    ]
    for i in range(blocks):
        p = f"blocks.{i}."
        specs.append((p + "modulation", (1, 6, DIM)))
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                specs.append((f"{p}{attn}.{proj}.weight", (DIM, DIM)))
                specs.append((f"{p}{attn}.{proj}.bias", (DIM,)))
            specs.append((f"{p}{attn}.norm_q.weight", (DIM,)))
            specs.append((f"{p}{attn}.norm_k.weight", (DIM,)))
            if attn == "self_attn":  # norm3 is registered between the two attentions
                specs.append((p + "norm3.weight", (DIM,)))
                specs.append((p + "norm3.bias", (DIM,)))
        specs += [
            (p + "ffn.0.weight", (FFN_DIM, DIM)),
            (p + "ffn.0.bias", (FFN_DIM,)),
            (p + "ffn.2.weight", (DIM, FFN_DIM)),
            (p + "ffn.2.bias", (DIM,)),
        ]
    specs += [
        ("head.modulation", (1, 2, DIM)),
        ("head.head.weight", (OUT_CHANNELS * math.prod(PATCH), DIM)),
        ("head.head.bias", (OUT_CHANNELS * math.prod(PATCH),)),
    ]
    return specs


def plan_shards(
    sizes: Iterable[tuple[str, int]], max_bytes: int = MAX_SHARD_BYTES
) -> list[list[str]]:
    """Greedy, order-preserving split of ``(key, nbytes)`` into shards of at most ``max_bytes``.

    huggingface_hub's rule: a tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, size in sizes:
        if current and current_bytes + size > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def shard_name(index: int, count: int) -> str:
    return f"{FILE_PREFIX}-{index + 1:05d}-of-{count:05d}.safetensors"


def delta_kind(key: str, shape: tuple[int, ...]) -> str:
    """``"none"`` (left unchanged), ``"lowrank"`` (spike + tail) or ``"dense"``."""
    if key.endswith(("norm_q.weight", "norm_k.weight")):
        return "none"
    if len(shape) == 2 and math.prod(shape) >= LOWRANK_MIN_NUMEL and key.endswith(".weight"):
        return "lowrank"
    return "dense"


def _is_norm_weight(key: str) -> bool:
    return ".norm" in key and key.endswith(".weight")


def _generator(seed: int, role: str, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{role}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def base_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """fp32 base value: N(0, 0.02), or 1 + N(0, 0.02) for norm weights."""
    t = torch.randn(shape, generator=_generator(seed, "base", key))
    if _is_norm_weight(key):
        return t.mul_(NORM_JITTER).add_(1.0)
    return t.mul_(BASE_STD)


def lowrank_delta(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Rank-16 spike plus a full-rank, slowly decaying tail, with RMS ``DELTA_RMS``."""
    rows, cols = shape
    k = min(rows, cols)
    a = torch.randn(rows, SPIKE_RANK, generator=gen)
    a *= SPIKE_DECAY ** torch.arange(SPIKE_RANK, dtype=torch.float32)
    spike = a @ torch.randn(SPIKE_RANK, cols, generator=gen)
    g1 = torch.randn(rows, k, generator=gen)
    g2 = torch.randn(k, cols, generator=gen)
    g2 *= torch.arange(1, k + 1, dtype=torch.float32).pow_(-TAIL_EXPONENT).unsqueeze(1)
    tail = g1 @ g2
    del g1, g2
    norm = DELTA_RMS * math.sqrt(rows * cols)  # the two parts are nearly orthogonal
    spike *= norm * math.sqrt(1.0 - TAIL_FRACTION**2) / spike.norm()
    tail *= norm * TAIL_FRACTION / tail.norm()
    return spike.add_(tail)


def delta_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor | None:
    """fp32 fine-tuning delta for one tensor, or ``None`` if the tensor is left unchanged."""
    kind = delta_kind(key, shape)
    if kind == "none":
        return None
    gen = _generator(seed, "delta", key)
    if kind == "lowrank":
        return lowrank_delta(shape, gen)
    rms = NORM_DELTA_RMS if _is_norm_weight(key) else DELTA_RMS
    return torch.randn(shape, generator=gen).mul_(rms)


class _StreamingShard:
    """A safetensors file written tensor by tensor from a header planned up front.

    Data goes to ``<path>.tmp`` and is renamed into place by ``close`` once every planned tensor
    has been written, so a finished-looking shard is always complete.
    """

    def __init__(self, path: str, entries: list[tuple[str, tuple[int, ...]]]) -> None:
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        pos = 0
        for key, shape in entries:
            size = math.prod(shape) * DTYPE.itemsize
            offsets = [pos, pos + size]
            header[key] = {"dtype": DTYPE_CODE, "shape": list(shape), "data_offsets": offsets}
            pos += size
        body = json.dumps(header, separators=(",", ":")).encode()
        body += b" " * (-len(body) % 8)  # the data buffer starts 8-byte aligned
        self.path = path
        self._tmp = path + ".tmp"
        self._pending = [(key, tuple(shape)) for key, shape in entries]
        self._file = open(self._tmp, "wb")
        self._file.write(len(body).to_bytes(8, "little") + body)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        expected_key, expected_shape = self._pending.pop(0)
        if key != expected_key or tuple(tensor.shape) != expected_shape or tensor.dtype != DTYPE:
            raise ValueError(
                f"{self.path}: got {key} {tuple(tensor.shape)} {tensor.dtype}, "
                f"planned {expected_key} {expected_shape} {DTYPE}"
            )
        self._file.write(memoryview(tensor.contiguous().view(torch.uint8).numpy()))

    def close(self) -> None:
        self._file.close()
        if self._pending:
            raise ValueError(f"{self.path}: {len(self._pending)} planned tensors never written")
        os.replace(self._tmp, self.path)


class _CheckpointWriter:
    """Writes one shard directory in plan order on a background thread (I/O overlaps compute)."""

    def __init__(
        self, directory: str, shards: list[list[str]], shapes: dict[str, tuple[int, ...]]
    ) -> None:
        self.directory = directory
        self._shards = shards
        self._shapes = shapes
        self._shard_of = {key: i for i, keys in enumerate(shards) for key in keys}
        self._left = [len(keys) for keys in shards]
        self._open: dict[int, _StreamingShard] = {}
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._futures: list[Future[None]] = []

    def submit(self, key: str, tensor: torch.Tensor) -> None:
        self._futures.append(self._pool.submit(self._write, key, tensor))
        while len(self._futures) > PENDING_WRITES:
            self._futures.pop(0).result()

    def _write(self, key: str, tensor: torch.Tensor) -> None:
        i = self._shard_of[key]
        if i not in self._open:
            path = os.path.join(self.directory, shard_name(i, len(self._shards)))
            self._open[i] = _StreamingShard(path, [(k, self._shapes[k]) for k in self._shards[i]])
        self._open[i].write(key, tensor)
        self._left[i] -= 1
        if self._left[i] == 0:
            self._open.pop(i).close()

    def finish(self) -> None:
        """Wait for every write, then write the index (last, so its presence means complete)."""
        for future in self._futures:
            future.result()
        self._pool.shutdown()
        if any(self._left):
            raise ValueError(f"{self.directory}: some planned tensors were never written")
        weight_map = {
            key: shard_name(self._shard_of[key], len(self._shards))
            for keys in self._shards
            for key in keys
        }
        total = sum(math.prod(self._shapes[key]) * DTYPE.itemsize for key in weight_map)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        path = os.path.join(self.directory, f"{FILE_PREFIX}.safetensors.index.json")
        with open(path + ".tmp", "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
        os.replace(path + ".tmp", path)


def _prepare_dir(directory: str, overwrite: bool) -> None:
    os.makedirs(directory, exist_ok=True)
    existing = sorted(os.listdir(directory))
    if existing and not overwrite:
        raise FileExistsError(
            f"{directory} is not empty; pass overwrite=True (--overwrite) to "
            f"replace the {FILE_PREFIX}* files in it"
        )
    for name in existing:
        if name.startswith(FILE_PREFIX):
            os.remove(os.path.join(directory, name))


def generate_pair(
    outdir: str,
    blocks: int = DEFAULT_BLOCKS,
    seed: int = 0,
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> tuple[str, str]:
    """Write ``outdir/base`` and ``outdir/finetuned`` and return their paths.

    ``progress(done, total, key)`` is called after each tensor is generated.
    """
    specs = wan_tensor_specs(blocks)
    shapes = dict(specs)
    shards = plan_shards(((k, math.prod(s) * DTYPE.itemsize) for k, s in specs), max_shard_bytes)
    base_dir = os.path.join(outdir, "base")
    tuned_dir = os.path.join(outdir, "finetuned")
    for directory in (base_dir, tuned_dir):
        _prepare_dir(directory, overwrite)
    base_writer = _CheckpointWriter(base_dir, shards, shapes)
    tuned_writer = _CheckpointWriter(tuned_dir, shards, shapes)
    for done, (key, shape) in enumerate(specs, start=1):
        base = base_tensor(key, shape, seed).to(DTYPE)
        delta = delta_tensor(key, shape, seed)
        tuned = base if delta is None else delta.add_(base.float()).to(DTYPE)
        base_writer.submit(key, base)
        tuned_writer.submit(key, tuned)
        if progress is not None:
            progress(done, len(specs), key)
    base_writer.finish()
    tuned_writer.finish()
    return base_dir, tuned_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", help="writes OUTDIR/base and OUTDIR/finetuned")
    parser.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS, help="transformer blocks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-shard-bytes",
        type=int,
        default=MAX_SHARD_BYTES,
        help="shard size limit, counted as shape x itemsize",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {FILE_PREFIX}* files already in the output directories",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()

    def report(done: int, total: int, key: str) -> None:
        if done == total or done % 50 == 0:
            print(f"[{time.perf_counter() - start:6.1f}s] {done}/{total} {key}", file=sys.stderr)

    try:
        paths = generate_pair(
            args.outdir,
            args.blocks,
            args.seed,
            max_shard_bytes=args.max_shard_bytes,
            overwrite=args.overwrite,
            progress=report,
        )
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
