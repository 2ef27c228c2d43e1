#!/bin/bash
# Wan 2.2 A14B T2V (two transformers) with LightX2V's 4-step distill LoRAs, one per expert
# (its scripts/wan22/distill/run_wan22_moe_t2v_distill_lora_4step.sh, run by loraforge infer).
# model_path: a diffusers folder, e.g. Wan2.2-T2V-A14B-Diffusers.
set -euo pipefail
loraforge_path=$(cd "$(dirname "$0")/../.." && pwd)
model_path=${model_path:?set model_path to a Wan2.2 T2V A14B diffusers folder}

loraforge infer \
    --model_cls wan2.2_moe_distill \
    --task t2v \
    --model_path "$model_path" \
    --config_json "${loraforge_path}/configs/infer_wan22_moe_t2v_distill_lora.json" \
    --prompt "Two anthropomorphic cats in comfy boxing gear and bright gloves fight intensely on a spotlighted stage." \
    --save_result_path "${loraforge_path}/save_results/output_wan22_moe_t2v_distill.mp4" \
    "$@"
