"""Switching a rank-64 LoRA on a live Wan2.1-1.3B-shaped transformer (dim 1536, 30 blocks, FFN
8960, 12 heads; bf16, 2.84 GB), as ``loraforge serve`` does between requests, three ways, each
in its own fresh process (so memory figures do not mix):

- loraforge: ``loraforge.apply(transformer, [], checkpoint=<its file>)``, then
  ``handle.replace([...])`` per switch (each touched weight recomputed from its original,
  re-read from the checkpoint: nothing held);
- diffusers fused: per switch ``unfuse_lora`` + ``unload_lora_weights`` of the previous LoRA,
  ``load_lora_weights`` + ``fuse_lora(lora_scale=s)`` of the next (diffusers' WanLoraLoaderMixin,
  PEFT underneath);
- diffusers unfused adapters: both LoRAs loaded once (``load_lora_weights``, timed as set-up),
  then ``set_adapters([name], [s])`` / ``disable_lora()`` per switch.

The switch sequence is L1@1.0 → L2@0.5 → none → L1@1.0 → none (L1, L2: rank 64 on every
block linear, q/k/v/o of both attentions and both FFN layers, in LightX2V's naming, which both
tools read). Per method: seconds per switch, memory held (loraforge's ``held_bytes``; the RSS
with L2 on and after the last switch to none, minus the RSS of the loaded model, every page of
it read, after glibc's malloc_trim), the transformer's forward time at a small latent
(1×16×1×32×32 and 64 text tokens: 256 tokens) of the base and with L1 on, and whether every
base weight is bit for bit the loaded model's after the last switch to none.

    python benchmarks/lora_switch.py WORKDIR [--blocks 30] [--steps 3]

WORKDIR/model (the transformer, random bf16 weights, one safetensors file) and WORKDIR/l1,
l2.safetensors are made on the first run.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

import psutil
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from measure import format_table  # noqa: E402

DIM, FFN, HEADS, RANK = 1536, 8960, 12, 64
METHODS = ("loraforge", "diffusers_fused", "diffusers_adapters")
SEQUENCE = [("l1", 1.0), ("l2", 0.5), (None, 0.0), ("l1", 1.0), (None, 0.0)]
MODULES = (
    [(f"self_attn.{p}", DIM, DIM) for p in "qkvo"]
    + [(f"cross_attn.{p}", DIM, DIM) for p in "qkvo"]
    + [("ffn.0", FFN, DIM), ("ffn.2", DIM, FFN)]
)


def config(blocks: int) -> dict:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=DIM // HEADS,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=FFN,
        num_layers=blocks,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )


def make(workdir: str, blocks: int) -> None:
    """The random bf16 transformer (a diffusers folder) and the two LoRAs, made once."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    model_dir = os.path.join(workdir, "model")
    if not os.path.exists(os.path.join(model_dir, "diffusion_pytorch_model.safetensors")):
        os.makedirs(model_dir, exist_ok=True)
        with init_empty_weights():
            model = WanTransformer3DModel(**config(blocks))
        g = torch.Generator().manual_seed(0)
        state = {
            key: (torch.randn(tuple(t.shape), generator=g) * 0.02).to(torch.bfloat16)
            for key, t in model.state_dict().items()
        }
        save_file(state, os.path.join(model_dir, "diffusion_pytorch_model.safetensors"))
        model.save_config(model_dir)
        del state
    for name, seed in (("l1", 1), ("l2", 2)):
        path = os.path.join(workdir, f"{name}.safetensors")
        if os.path.exists(path):
            continue
        g = torch.Generator().manual_seed(seed)
        lora = {}
        for block in range(blocks):
            for module, out_dim, in_dim in MODULES:
                key = f"diffusion_model.blocks.{block}.{module}"
                lora[f"{key}.lora_down.weight"] = (
                    torch.randn(RANK, in_dim, generator=g) * 0.01
                ).to(torch.bfloat16)
                lora[f"{key}.lora_up.weight"] = (torch.randn(out_dim, RANK, generator=g) * 0.01).to(
                    torch.bfloat16
                )
                lora[f"{key}.alpha"] = torch.tensor(float(RANK), dtype=torch.bfloat16)
        save_file(lora, path)


def rss() -> int:
    """This process's RSS once freed heap memory is handed back (glibc's malloc_trim), so
    what is counted is what is held."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def base_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights, PEFT's wrapping removed (``base_layer``), its LoRA tensors left
    out."""
    found = {}
    for key, tensor in module.state_dict().items():
        if "lora_" in key:
            continue
        found[key.replace(".base_layer.", ".")] = tensor
    return found


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(base_weights(module).items()):
        h.update(key.encode())
        h.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def forward_seconds(model, steps: int) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 32, 32, generator=g).to(torch.bfloat16)
    text = torch.randn(1, 64, 4096, generator=g).to(torch.bfloat16)
    t = torch.tensor([500.0])
    times = []
    with torch.inference_mode():
        model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)  # warm
        for _ in range(steps):
            start = time.perf_counter()
            model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_method(method: str, workdir: str, steps: int) -> dict:
    """One method in this (fresh) process: the base's step time, the switches, memory held
    with a LoRA on and after the last switch to none, bit-exactness, the step time with L1."""
    from diffusers import WanPipeline, WanTransformer3DModel
    from diffusers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model_dir = os.path.join(workdir, "model")
    model = WanTransformer3DModel.from_pretrained(model_dir, torch_dtype=torch.bfloat16).eval()
    base = digest(model)  # reads every weight: all of the model is resident from here on
    result: dict = {"method": method, "base_step_s": round(forward_seconds(model, steps), 3)}
    loaded = rss()
    path = {name: os.path.join(workdir, f"{name}.safetensors") for name in ("l1", "l2")}
    current = None
    if method == "loraforge":  # imported before the clock starts, as diffusers is
        import loraforge
    start = time.perf_counter()
    if method == "loraforge":
        handle = loraforge.apply(model, [], checkpoint=model_dir)

        def switch(name, strength):
            handle.replace([(path[name], strength)] if name else [])

    elif method == "diffusers_adapters":
        pipe = WanPipeline(
            tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=model
        )
        for name in ("l1", "l2"):
            pipe.load_lora_weights(path[name], adapter_name=name)
        pipe.disable_lora()

        def switch(name, strength):
            if name is None:
                pipe.disable_lora()
            else:
                pipe.enable_lora()
                pipe.set_adapters([name], adapter_weights=[strength])

    else:
        pipe = WanPipeline(
            tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=model
        )

        def switch(name, strength):
            nonlocal current
            if current is not None:
                pipe.unfuse_lora()
                pipe.unload_lora_weights()
            if name is not None:
                pipe.load_lora_weights(path[name], adapter_name=name)
                pipe.fuse_lora(lora_scale=strength, adapter_names=[name])
            current = name

    result["setup_s"] = round(time.perf_counter() - start, 3)
    result["switch_s"] = []
    for index, (name, strength) in enumerate(SEQUENCE):
        start = time.perf_counter()
        switch(name, strength)
        result["switch_s"].append(round(time.perf_counter() - start, 3))
        if index == 1:  # L2 on
            result["rss_lora_bytes"] = rss() - loaded
    result["rss_none_bytes"] = rss() - loaded
    result["held_bytes"] = handle.held_bytes if method == "loraforge" else None
    result["bit_exact"] = digest(model) == base
    switch("l1", 1.0)
    result["step_s"] = round(forward_seconds(model, steps), 3)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir")
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--steps", type=int, default=3, help="timed forwards per figure")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # the child
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.method:
        print(json.dumps(run_method(args.method, args.workdir, args.steps)))
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    start = time.perf_counter()
    make(args.workdir, args.blocks)
    print(f"model and LoRAs ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    rows = []
    for method in METHODS:
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                args.workdir,
                "--steps",
                str(args.steps),
                "--method",
                method,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(json.dumps(result), file=sys.stderr)
        switches = result["switch_s"]
        rows.append(
            {
                "method": method,
                "set-up s": result["setup_s"],
                "L1 s": switches[0],
                "L1→L2@0.5 s": switches[1],
                "L2→none s": switches[2],
                "none→L1 s": switches[3],
                "L1→none s": switches[4],
                "held MB": None if result["held_bytes"] is None else result["held_bytes"] / 1e6,
                "RSS +MB (LoRA on)": round(result["rss_lora_bytes"] / 1e6),
                "RSS +MB (none)": round(result["rss_none_bytes"] / 1e6),
                "step s (L1)": result["step_s"],
                "step s (base)": result["base_step_s"],
                "bit-exact": "yes" if result["bit_exact"] else "no",
            }
        )
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
