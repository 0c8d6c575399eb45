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
EPOCHS=${EPOCHS:-1}
MAX_STEPS=${MAX_STEPS:--1}
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-4096}
IMAGE_ASPECT_RATIO=${IMAGE_ASPECT_RATIO:-anyres}
MAX_NUM_SUB_IMAGES=${MAX_NUM_SUB_IMAGES:-4}
MM_PATCH_MERGE_TYPE=${MM_PATCH_MERGE_TYPE:-spatial_unpad}
MOD_TARGET_LAYERS=${MOD_TARGET_LAYERS:-shiftedcos_decay_0.85_0.15}
MOD_TARGET_TOKEN_TYPE=${MOD_TARGET_TOKEN_TYPE:-vision_all}
MOD_ROUTER_FACTOR=${MOD_ROUTER_FACTOR:-0.5}
MOD_WEIGHT_NORM=${MOD_WEIGHT_NORM:-tanh_0.2_1}
MOD_BIAS_ENABLED=${MOD_BIAS_ENABLED:-True}
MOD_SPECIAL_INIT=${MOD_SPECIAL_INIT:-True}
PRECISION_FLAGS=${PRECISION_FLAGS:---bf16 True --tf32 True}
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-True}
NUM_WORKERS=${NUM_WORKERS:-4}
SAVE_STEPS=${SAVE_STEPS:-50000}
REPORT_TO=${REPORT_TO:-none}
DEFAULT_DS_CONFIG=scripts/zero3.json
source "$(dirname "${BASH_SOURCE[0]}")/train_launcher.sh"

# shellcheck disable=SC2086
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
    --max_num_sub_images "$MAX_NUM_SUB_IMAGES" \
    --mm_patch_merge_type "$MM_PATCH_MERGE_TYPE" \
    --group_by_modality_length True \
    --mod_target_layers "$MOD_TARGET_LAYERS" \
    --mod_target_token_type "$MOD_TARGET_TOKEN_TYPE" \
    --mod_router_factor "$MOD_ROUTER_FACTOR" \
    --mod_weight_norm "$MOD_WEIGHT_NORM" \
    --mod_bias_enabled "$MOD_BIAS_ENABLED" \
    --mod_special_init "$MOD_SPECIAL_INIT" \
    $PRECISION_FLAGS \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs "$EPOCHS" \
    --max_steps "$MAX_STEPS" \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --eval_strategy no \
    --save_strategy steps \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit 1 \
    --learning_rate "$LR" \
    --weight_decay 0. \
    --warmup_steps 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps 1 \
    --model_max_length "$MODEL_MAX_LENGTH" \
    --gradient_checkpointing "$GRADIENT_CHECKPOINTING" \
    --dataloader_num_workers "$NUM_WORKERS" \
    --lazy_preprocess True \
    --report_to "$REPORT_TO" \
    --attn_implementation "${ATTN_IMPL:-auto}" \
    "$@"
