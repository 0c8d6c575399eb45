#!/usr/bin/env bash
# Stage 2 (LLaVA-1.5 visual instruction tuning): train the LLM and the projector on LLaVA-665K (v1 template).
# Recipe: 1 epoch, lr 2e-5, global batch 128 (16 x 8 GPUs), pad aspect, modality-grouped batches, ZeRO-3,
# projector initialised from stage 1. Every path and size is an environment variable; extra arguments go to
# llava.train.train (last one wins).
set -euo pipefail

MODEL=${MODEL:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
PRETRAIN_ADAPTER=${PRETRAIN_ADAPTER-./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin}
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/llava-v1.5-7b}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-16}
LR=${LR:-2e-5}
IMAGE_ASPECT_RATIO=${IMAGE_ASPECT_RATIO:-pad}
SAVE_STEPS=${SAVE_STEPS:-50000}
DEFAULT_DS_CONFIG=scripts/zero3.json
source "$(dirname "${BASH_SOURCE[0]}")/train_launcher.sh"

launch_train \
    --model_name_or_path "$MODEL" \
    --version v1 \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    --pretrain_mm_mlp_adapter "$PRETRAIN_ADAPTER" \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_im_start_end False \
    --mm_use_im_patch_token False \
    --image_aspect_ratio "$IMAGE_ASPECT_RATIO" \
    --group_by_modality_length True \
    "${common_flags[@]}" \
    "$@"
