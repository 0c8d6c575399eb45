#!/usr/bin/env bash
# The embedded tiny default, with nothing to download: build tiny CLIP + Llama models and a synthetic
# multimodal data set, train stage 1, then stage 2 dense and p-MoD through the same scripts used on GPUs,
# evaluate both with the lmms-eval plugin, and write a report with accuracy, TFLOPs, KV cache, wall time and
# token-selection figures (docs/demo.md). Sets up the Python environment on a fresh machine.
# Usage: bash scripts/demo.sh [--scale tiny|full] [--out DIR] [--seed N] [--set KEY=VALUE ...]
# (DEMO_SCALE and DEMO_DIR are read too; the default is the full demo in demo_output/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
python -m llava.demo.run "$@"
