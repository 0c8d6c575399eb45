#!/usr/bin/env bash
# Evaluate a checkpoint on the paper's 14 benchmarks with lmms-eval (model `pmod_llava`, or `pmod_hf` for
# transformers' own VLMs; data parallel over the GPUs), then print one table in the paper's units
# (python -m llava.eval.summarize).
#
#   CKPT=./checkpoints/pmod-llava-v1.5-7b bash scripts/eval.sh
#   CKPT=... TASKS=mme,pope_full NUM_GPUS=2 BATCH_SIZE=1 bash scripts/eval.sh --limit 20
#
# Environment (all optional): CKPT (folder or hub id), TASKS (comma separated), NUM_GPUS (0 = one CPU
# process; default: every visible GPU), OUTPUT_DIR (default: $CKPT/logs for a local CKPT, else
# ./logs/eval/<name>), BATCH_SIZE (default 1, the paper's), LMMS_MODEL (pmod_llava or pmod_hf; default: chosen
# from CKPT's config.json by python -m llava.eval.model_choice), CONV_TEMPLATE (pmod_llava; default vicuna_v1),
# LOG_EFFICIENCY (1 = per-sample TFLOPs / KV cache records, default 1), EXTRA_MODEL_ARGS (appended to
# --model_args, e.g. dtype=bfloat16), INCLUDE_PATH (extra task folder), PORT (default 12345), PYTHON.
# Extra arguments are passed to lmms-eval.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PAPER_TASKS=ok_vqa,scienceqa_img,mme,seedbench,pope_full,realworldqa,gqa,ai2d,textvqa_val,chartqa,docvqa_val,infovqa_val,mmbench_en_dev,mmmu_val
CKPT=${CKPT:-MCG-NJU/p-MoD-LLaVA-NeXT-7B}
TASKS=${TASKS:-$PAPER_TASKS}
CONV_TEMPLATE=${CONV_TEMPLATE:-vicuna_v1}
BATCH_SIZE=${BATCH_SIZE:-1}
LOG_EFFICIENCY=${LOG_EFFICIENCY:-1}
PORT=${PORT:-12345}
PYTHON=${PYTHON:-python}
if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
fi
if [[ -z "${OUTPUT_DIR:-}" ]]; then
    if [[ -d "$CKPT" ]]; then OUTPUT_DIR="$CKPT/logs"; else OUTPUT_DIR="./logs/eval/$(basename "$CKPT")"; fi
fi

for name in CKPT CONV_TEMPLATE OUTPUT_DIR; do
    if [[ "${!name}" == *,* ]]; then
        echo "eval.sh: $name must not contain a comma (lmms-eval splits --model_args on commas): ${!name}" >&2
        exit 2
    fi
done
if ! [[ "$NUM_GPUS" =~ ^[0-9]+$ ]]; then
    echo "eval.sh: NUM_GPUS must be a non-negative integer, got '$NUM_GPUS'" >&2
    exit 2
fi
if ! [[ "$BATCH_SIZE" =~ ^[1-9][0-9]*$ ]]; then
    echo "eval.sh: BATCH_SIZE must be a positive integer, got '$BATCH_SIZE'" >&2
    exit 2
fi

LMMS_MODEL=${LMMS_MODEL:-$("$PYTHON" -m llava.eval.model_choice "$CKPT")}
case "$LMMS_MODEL" in
    pmod_llava) model_args="pretrained=$CKPT,conv_template=$CONV_TEMPLATE" ;;
    pmod_hf) model_args="pretrained=$CKPT" ;;  # the checkpoint's own chat template
    *) echo "eval.sh: LMMS_MODEL must be pmod_llava or pmod_hf, got '$LMMS_MODEL'" >&2; exit 2 ;;
esac
if [[ "$LOG_EFFICIENCY" == 1 ]]; then
    model_args+=",log_efficiency=True,efficiency_dir=$OUTPUT_DIR/efficiency"
fi
if [[ "$NUM_GPUS" == 0 ]]; then
    model_args+=",device=cpu"
fi
if [[ -n "${EXTRA_MODEL_ARGS:-}" ]]; then
    model_args+=",$EXTRA_MODEL_ARGS"
fi

"$PYTHON" -m llava.eval.deps  # a broken lmms-eval install fails here, with the fix, not mid-run
export HF_HUB_ENABLE_HF_TRANSFER=0
mkdir -p "$OUTPUT_DIR"
rm -f "$OUTPUT_DIR"/efficiency/efficiency_rank*.jsonl

lmms_args=(--model "$LMMS_MODEL" --model_args "$model_args" --tasks "$TASKS" --batch_size "$BATCH_SIZE"
           --log_samples --output_path "$OUTPUT_DIR")
if [[ -n "${INCLUDE_PATH:-}" ]]; then
    lmms_args+=(--include_path "$INCLUDE_PATH")
fi

if [[ "$NUM_GPUS" == 0 ]]; then
    launcher=("$PYTHON" -m lmms_eval)
else
    launcher=("$PYTHON" -m accelerate.commands.launch --num_processes "$NUM_GPUS" --main_process_port "$PORT")
    if [[ -f "${HF_HOME:-$HOME/.cache/huggingface}/accelerate/default_config.yaml" ]]; then
        launcher+=(--config_file "${HF_HOME:-$HOME/.cache/huggingface}/accelerate/default_config.yaml")
    fi
    launcher+=(-m lmms_eval)
fi

echo "eval.sh: $CKPT ($LMMS_MODEL) on $TASKS ($NUM_GPUS GPUs, batch size $BATCH_SIZE) -> $OUTPUT_DIR" >&2
"${launcher[@]}" "${lmms_args[@]}" "$@"
"$PYTHON" -m llava.eval.summarize "$OUTPUT_DIR"
