#!/usr/bin/env bash
# p-MoD fine-tuning of Qwen2.5-VL-7B-Instruct on LLaVA-format data: scripts/finetune_pmod_hf.sh with this family's
# defaults (MODEL, LR). Every variable of that script can be overridden; extra arguments go to the trainer.
set -euo pipefail
export MODEL=${MODEL:-Qwen/Qwen2.5-VL-7B-Instruct} LR=${LR:-1e-5}
exec bash "$(dirname "${BASH_SOURCE[0]}")/finetune_pmod_hf.sh" "$@"
