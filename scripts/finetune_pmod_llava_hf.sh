#!/usr/bin/env bash
# p-MoD fine-tuning of LLaVA-1.5-7B (llava-hf) on LLaVA-format data: scripts/finetune_pmod_hf.sh with this family's
# defaults (MODEL, LR). Every variable of that script can be overridden; extra arguments go to the trainer.
set -euo pipefail
export MODEL=${MODEL:-llava-hf/llava-1.5-7b-hf} LR=${LR:-2e-5}
exec bash "$(dirname "${BASH_SOURCE[0]}")/finetune_pmod_hf.sh" "$@"
