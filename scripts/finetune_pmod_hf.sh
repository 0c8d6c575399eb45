#!/usr/bin/env bash
# p-MoD fine-tuning of a transformers-native VLM (LLaVA-HF, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL)
# on LLaVA-format JSON, through its own processor and chat template (python -m llava.train.train_hf). The
# per-family scripts (finetune_pmod_<family>.sh) set MODEL and the learning rate and run this one.
# Defaults follow p-MoD's stage 2: 1 epoch, global batch 128, bf16, gradient checkpointing, the official
# schedule (shiftedcos_decay_0.85_0.15, factor 0.5, tanh_0.2_1, router bias and zero init); the vision tower
# stays frozen. PMOD=0 fine-tunes the dense model with the same recipe (the baseline). Every path and size is an
# environment variable; extra arguments go to the trainer.
set -euo pipefail

MODEL=${MODEL:?set MODEL, or run one of scripts/finetune_pmod_<family>.sh}
DATA_PATH=${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-./playground/data}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/pmod-$(basename "$MODEL")}
GLOBAL_BATCH=${GLOBAL_BATCH:-128}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-4}
LR=${LR:-1e-5}
SAVE_STEPS=${SAVE_STEPS:-100}
DEFAULT_DS_CONFIG=scripts/zero3.json
TRAIN_MODULE=llava.train.train_hf
source "$(dirname "${BASH_SOURCE[0]}")/train_launcher.sh"
[[ "${PMOD:-1}" == 0 ]] && pmod_flags=()

launch_train \
    --model_name_or_path "$MODEL" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    "${pmod_flags[@]}" \
    "${common_flags[@]}" \
    "$@"
