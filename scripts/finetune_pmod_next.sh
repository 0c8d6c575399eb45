#!/usr/bin/env bash
# Stage 2 for p-MoD-LLaVA-NeXT (the official recipe): Vicuna-7B-v1.5 + the LLaVA-1.5 stage-1 projector on the
# 779K LLaVA-NeXT data, 1 epoch, lr 2e-5, global batch 128 (8 x 2 accumulation x 8 GPUs), max length 4096,
# ZeRO-3, bf16, tf32, gradient checkpointing. AnyRes with at most 4 sub-images (the 1x2, 2x1, 2x2, 3x1, 1x3
# grids of 336 px tiles) and spatial_unpad (up to 2928 vision tokens per image); the vision tower stays frozen.
# p-MoD: shiftedcos_decay_0.85_0.15 schedule, factor 0.5, TanhNorm tanh_0.2_1, router bias and zero init,
# vision_all targets (base tile, high-res tiles and their newline tokens).
# Every path and size is an environment variable; extra arguments go to llava.train.train (last one wins).
set -euo pipefail

MODEL=${MODEL:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
PRETRAIN_ADAPTER=${PRETRAIN_ADAPTER-./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin}
DATA_PATH=${DATA_PATH:-./playground/data/llava_next_data.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data/llava_next_images}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/pmod-llava-next-7b}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-8}
LR=${LR:-2e-5}
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-4096}
IMAGE_ASPECT_RATIO=${IMAGE_ASPECT_RATIO:-anyres}
MAX_NUM_SUB_IMAGES=${MAX_NUM_SUB_IMAGES:-4}
MM_PATCH_MERGE_TYPE=${MM_PATCH_MERGE_TYPE:-spatial_unpad}
SAVE_STEPS=${SAVE_STEPS:-50000}
DEFAULT_DS_CONFIG=scripts/zero3.json
source "$(dirname "${BASH_SOURCE[0]}")/train_launcher.sh"

set_stage2_flags
launch_train \
    "${stage2_flags[@]}" \
    --max_num_sub_images "$MAX_NUM_SUB_IMAGES" \
    --mm_patch_merge_type "$MM_PATCH_MERGE_TYPE" \
    "${pmod_flags[@]}" \
    "${common_flags[@]}" \
    "$@"
