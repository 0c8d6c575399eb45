#!/usr/bin/env bash
# Stage 1 (LLaVA-1.5 feature alignment): train the mlp2x_gelu projector on LCS-558K with the plain template.
# Recipe: 1 epoch, lr 1e-3, global batch 256 (32 x 8 GPUs), max length 2048, bf16, tf32, ZeRO-2.
# Every path and size is an environment variable; extra arguments go to llava.train.train (last one wins).
set -euo pipefail

MODEL=${MODEL:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
DATA_PATH=${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b-pretrain}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-32}
LR=${LR:-1e-3}
SAVE_STEPS=${SAVE_STEPS:-24000}
DEFAULT_DS_CONFIG=scripts/zero2.json
source "$(dirname "${BASH_SOURCE[0]}")/train_launcher.sh"

launch_train \
    --model_name_or_path "$MODEL" \
    --version plain \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    --mm_projector_type mlp2x_gelu \
    --tune_mm_mlp_adapter True \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    "${common_flags[@]}" \
    "$@"
