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

set_stage2_flags
launch_train \
    "${stage2_flags[@]}" \
    "${common_flags[@]}" \
    "$@"
