#!/usr/bin/env bash
# Stage 2 for p-MoD-LLaVA-1.5 (the official recipe): Vicuna-7B-v1.5 + the stage-1 projector on LLaVA-665K,
# 1 epoch, lr 2e-5, global batch 128 (4 x 4 accumulation x 8 A6000), max length 2048, bf16, tf32, gradient
# checkpointing; p-MoD: shiftedcos_decay_0.85_0.15 schedule, factor 0.5, TanhNorm tanh_0.2_1, router bias and
# zero init, vision_all targets. The official run used ZeRO-1; ZeRO-2 does the same math with less memory.
# Every path and size is an environment variable; extra arguments go to llava.train.train (last one wins).
set -euo pipefail

MODEL=${MODEL:-lmsys/vicuna-7b-v1.5}
VISION_TOWER=${VISION_TOWER:-openai/clip-vit-large-patch14-336}
PRETRAIN_ADAPTER=${PRETRAIN_ADAPTER-./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin}
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/pmod-llava-v1.5-7b}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-4}
LR=${LR:-2e-5}
IMAGE_ASPECT_RATIO=${IMAGE_ASPECT_RATIO:-pad}
SAVE_STEPS=${SAVE_STEPS:-100}
DEFAULT_DS_CONFIG=scripts/zero2.json
source "$(dirname "${BASH_SOURCE[0]}")/train_launcher.sh"

set_stage2_flags
launch_train \
    "${stage2_flags[@]}" \
    "${pmod_flags[@]}" \
    "${common_flags[@]}" \
    "$@"
