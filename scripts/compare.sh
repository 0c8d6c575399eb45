#!/usr/bin/env bash
# Vision-token reducers (FastV, PyramidDrop, random, uniform) and p-MoD side by side at matched budgets:
# accuracy through lmms-eval, T_avg, TFLOPs, KV cache and prefill latency in one table and a plot.
#
#   bash scripts/compare.sh                              # embedded tiny default: builds the tiny demo first
#   bash scripts/compare.sh --dense CKPT --pmod PMOD_CKPT --tasks mme,pope_full --budgets 0.333,0.222,0.111
#
# All options: python -m llava.eval.compare --help. Output: compare_output/ (or --out DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1} WANDB_MODE=offline
python -m llava.eval.compare "$@"
