#!/bin/bash
# Wan 2.1 I2V with LightX2V's 4-step distill LoRA (its scripts/wan/distill/
# run_wan_i2v_distill_lora_4step_cfg.sh, run by loraforge infer).
# model_path: a diffusers folder, e.g. Wan2.1-I2V-14B-480P-Diffusers; image_path: the input image.
set -euo pipefail
loraforge_path=$(cd "$(dirname "$0")/../.." && pwd)
model_path=${model_path:?set model_path to a Wan2.1 I2V diffusers folder}
image_path=${image_path:?set image_path to the input image}

loraforge infer \
    --model_cls wan2.1_distill \
    --task i2v \
    --model_path "$model_path" \
    --config_json "${loraforge_path}/configs/infer_wan21_i2v_distill_lora_4step_cfg.json" \
    --prompt "Summer beach vacation style, a white cat wearing sunglasses sits on a surfboard. The fluffy-furred feline gazes directly at the camera with a relaxed expression. Blurred beach scenery forms the background featuring crystal-clear waters, distant green hills, and a blue sky dotted with white clouds. The cat assumes a naturally relaxed posture, as if savoring the sea breeze and warm sunlight. A close-up shot highlights the feline's intricate details and the refreshing atmosphere of the seaside." \
    --negative_prompt "镜头晃动，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走" \
    --image_path "$image_path" \
    --save_result_path "${loraforge_path}/save_results/wan_i2v_distill_lora_4step_cfg.mp4" \
    "$@"
