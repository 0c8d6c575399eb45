#!/usr/bin/env bash
# p-MoD fine-tuning of LLaVA-OneVision-7B on LLaVA-format data: scripts/finetune_pmod_hf.sh with this family's
# defaults (MODEL, LR). Every variable of that script can be overridden; extra arguments go to the trainer.
set -euo pipefail
export MODEL=${MODEL:-llava-hf/llava-onevision-qwen2-7b-ov-hf} LR=${LR:-1e-5}
exec bash "$(dirname "${BASH_SOURCE[0]}")/finetune_pmod_hf.sh" "$@"
