#!/usr/bin/env bash
# p-MoD on transformers' own VLMs with nothing to download: tiny Qwen2.5-VL and LLaVA-OneVision checkpoints
# (with their processors and chat templates) fine-tuned dense and p-MoD on synthetic shape data through
# scripts/finetune_pmod_<family>.sh, the p-MoD one reloaded with pmod.hf.from_pretrained, both evaluated through
# the lmms-eval plugin (scripts/eval.sh, model pmod_hf); a report compares accuracy, TFLOPs, KV cache and kept
# tokens (docs/hf_models.md). Sets up the Python environment on a fresh machine.
# Usage: bash scripts/demo_hf.sh [--scale tiny|full] [--families qwen2_5_vl,llava_onevision] [--out DIR]
#        [--seed N] [--set KEY=VALUE ...]   (DEMO_SCALE and DEMO_DIR are read too; default: full, demo_hf_output/)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
python -m llava.demo.hf_run "$@"
