#!/bin/bash
# Wan 2.1 T2V with LightX2V's 4-step distill LoRA (its scripts/wan/distill/
# run_wan_t2v_distill_lora_4step_cfg.sh, run by loraforge infer; --use_prompt_enhancer dropped).
# model_path: a diffusers folder, e.g. Wan2.1-T2V-14B-Diffusers. The config's LoRA path,
# lightx2v/Wan2.1-Distill-Loras/..., is read beside the config, then from the working directory.
set -euo pipefail
loraforge_path=$(cd "$(dirname "$0")/../.." && pwd)
model_path=${model_path:?set model_path to a Wan2.1 T2V diffusers folder}

loraforge infer \
    --model_cls wan2.1_distill \
    --task t2v \
    --model_path "$model_path" \
    --config_json "${loraforge_path}/configs/infer_wan21_t2v_distill_lora_4step_cfg.json" \
    --prompt "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage." \
    --negative_prompt "镜头晃动，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走" \
    --save_result_path "${loraforge_path}/save_results/wan_t2v_distill_lora_4step.mp4" \
    "$@"
