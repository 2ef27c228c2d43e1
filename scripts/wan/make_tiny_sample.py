"""A tiny random Wan sample to try ``loraforge infer`` / ``serve`` on, built on the CPU in a few
seconds without the model hub: diffusers model folders (Wan 2.1 T2V and I2V, Wan 2.2 MoE T2V)
with a tiny transformer, VAE, UMT5 encoder and a tokenizer made from a small vocabulary, two
LoRAs in LightX2V's naming (Wan's original module names), configs in LightX2V's shape, an input
image, and the T2V transformer once more in Wan's original layout. Every weight is seeded: the
same bytes on every run. The tests build their pipelines with this file.

    python3 scripts/wan/make_tiny_sample.py OUT     # needs: pip install -e '.[infer]'

OUT/model, OUT/model_i2v, OUT/model_moe          diffusers folders (fp32)
OUT/loras/style_a.safetensors, style_b...        rank-4 LoRAs (attention and FFN of each block)
OUT/lora_config.json, distill_config.json, moe_config.json   LightX2V configs
OUT/image.png                                    32x32 input for --task i2v
OUT/transformer_original.safetensors             OUT/model's transformer, Wan's original names
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

Z_DIM, TEXT_DIM, HEADS, HEAD_DIM, CLIP_DIM, LAYERS = 4, 32, 2, 16, 16, 2
INNER = HEADS * HEAD_DIM
WORDS = (
    "a cat dog bird fish robot car tree house sky sea sun moon star red green blue white black "
    "small big fast slow runs flies swims sits jumps on in the with under over and of video of "
    "beautiful ugly bright dark static blurred low quality worst best"
).split()
SHAPE = {"target_video_length": 5, "target_height": 32, "target_width": 32}


def tokenizer():
    """A WordLevel tokenizer with T5's id convention (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=512,
    )


def text_encoder(vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(
        base_dim=3,
        z_dim=Z_DIM,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * Z_DIM,
        latents_std=[1.0] * Z_DIM,
    ).eval()


def transformer(in_channels: int = Z_DIM, image_dim: int | None = None):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=in_channels,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=LAYERS,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        added_kv_proj_dim=INNER if image_dim else None,
        rope_max_seq_len=32,
    ).eval()


def scheduler(shift: float = 3.0):
    """What the Wan-AI diffusers folders ship: UniPC over flow sigmas."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=shift,
        solver_order=2,
        solver_type="bh2",
    )


def build_models(out: str) -> dict[str, str]:
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    tok = tokenizer()
    parts = {"tokenizer": tok, "text_encoder": text_encoder(len(tok)), "vae": vae()}
    paths = {name: os.path.join(out, name) for name in ("model", "model_i2v", "model_moe")}
    WanPipeline(**parts, scheduler=scheduler(), transformer=transformer()).save_pretrained(
        paths["model"]
    )
    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=CLIP_DIM,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=CLIP_DIM,
        )
    ).eval()
    WanImageToVideoPipeline(
        **parts,
        scheduler=scheduler(),
        image_processor=CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32}),
        image_encoder=encoder,
        transformer=transformer(2 * Z_DIM + 4, image_dim=CLIP_DIM),  # noise + mask + image
    ).save_pretrained(paths["model_i2v"])
    WanPipeline(
        **parts,
        scheduler=scheduler(12.0),
        transformer=transformer(),
        transformer_2=transformer(),
        boundary_ratio=0.875,
    ).save_pretrained(paths["model_moe"])
    return paths


def lora(seed: int) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA in LightX2V's naming: self-attention q/k/v/o and the FFN of each block."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    modules = [(f"self_attn.{p}", INNER, INNER) for p in "qkvo"] + [
        ("ffn.0", 64, INNER),
        ("ffn.2", INNER, 64),
    ]
    for block in range(LAYERS):
        for module, out_dim, in_dim in modules:
            name = f"diffusion_model.blocks.{block}.{module}"
            tensors[f"{name}.lora_down.weight"] = torch.randn(4, in_dim, generator=g) * 0.3
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, 4, generator=g) * 0.3
            tensors[f"{name}.alpha"] = torch.tensor(4.0)
    return tensors


def original_transformer(model: str) -> dict[str, torch.Tensor]:
    """``model``'s transformer under Wan's original names (diffusers' converter, reversed)."""
    from safetensors.torch import load_file

    from loraforge.pipeline.lora.layouts import ORIGINAL, renamed

    state = load_file(os.path.join(model, "transformer", "diffusion_pytorch_model.safetensors"))
    return {renamed(key, ORIGINAL) or key: value for key, value in state.items()}


def build(out: str) -> dict[str, str]:
    """Everything, under ``out``; returns the paths by name."""
    from loraforge.pipeline.runtime.load import quiet

    quiet()
    os.makedirs(os.path.join(out, "loras"), exist_ok=True)
    paths = build_models(out)
    for name, seed in (("style_a", 1), ("style_b", 2)):
        paths[name] = os.path.join(out, "loras", f"{name}.safetensors")
        save_file(lora(seed), paths[name])
    paths["transformer_original"] = os.path.join(out, "transformer_original.safetensors")
    save_file(original_transformer(paths["model"]), paths["transformer_original"])
    style_a = {"path": "loras/style_a.safetensors", "strength": 1.0}
    configs = {
        "lora_config": {
            "infer_steps": 4,
            **SHAPE,
            "sample_guide_scale": 5.0,
            "sample_shift": 3.0,
            "enable_cfg": True,
            "lora_configs": [style_a],
        },
        "distill_config": {
            "infer_steps": 4,
            **SHAPE,
            "sample_guide_scale": 6,
            "sample_shift": 5,
            "enable_cfg": False,
            "denoising_step_list": [1000, 750, 500, 250],
            "lora_configs": [style_a],
        },
        "moe_config": {
            "infer_steps": 4,
            **SHAPE,
            "sample_guide_scale": [4.0, 3.0],
            "sample_shift": 5.0,
            "enable_cfg": False,
            "boundary_step_index": 2,
            "denoising_step_list": [1000, 750, 500, 250],
            "lora_configs": [
                {"name": "high_noise_model", **style_a},
                {"name": "low_noise_model", "path": "loras/style_b.safetensors", "strength": 1.0},
            ],
        },
    }
    for name, config in configs.items():
        paths[name] = os.path.join(out, f"{name}.json")
        with open(paths[name], "w") as f:
            json.dump(config, f, indent=1)
    from PIL import Image

    paths["image"] = os.path.join(out, "image.png")
    pixels = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(paths["image"])
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="directory to build the sample in")
    args = parser.parse_args()
    for name, path in build(os.path.abspath(args.out)).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
