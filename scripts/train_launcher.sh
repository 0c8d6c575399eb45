# Shared by pretrain.sh / finetune.sh / finetune_pmod.sh (sourced, not run): GPU count, gradient accumulation
# that keeps the global batch constant, and the launcher (deepspeed, torchrun or python).
# Expects GLOBAL_BATCH and PER_DEVICE_BATCH to be set by the caller.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    (( NUM_GPUS > 0 )) || NUM_GPUS=1
fi
LAUNCHER=${LAUNCHER:-deepspeed}
MASTER_PORT=${MASTER_PORT:-29501}

if [[ -z "${GRAD_ACCUM:-}" ]]; then
    per_step=$(( NUM_GPUS * PER_DEVICE_BATCH ))
    if (( GLOBAL_BATCH % per_step != 0 )); then
        echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of NUM_GPUS=$NUM_GPUS x PER_DEVICE_BATCH=$PER_DEVICE_BATCH; set GRAD_ACCUM" >&2
        exit 2
    fi
    GRAD_ACCUM=$(( GLOBAL_BATCH / per_step ))
fi

# DeepSpeed config: the stage's default with the deepspeed launcher, none with the others unless DS_CONFIG is set.
ds_flags=()
if [[ "$LAUNCHER" == deepspeed ]]; then
    ds_flags=(--deepspeed "${DS_CONFIG:-$DEFAULT_DS_CONFIG}")
elif [[ -n "${DS_CONFIG:-}" ]]; then
    ds_flags=(--deepspeed "$DS_CONFIG")
fi

# Run llava.train.train under the chosen launcher with the given flags plus the DeepSpeed flag.
launch_train() {
    local cmd
    case "$LAUNCHER" in
        deepspeed) cmd=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module llava.train.train) ;;
        torchrun) cmd=(torchrun --nproc_per_node "$NUM_GPUS" --master_port "$MASTER_PORT" -m llava.train.train) ;;
        python) cmd=("${PYTHON:-python}" -m llava.train.train) ;;
        *) echo "LAUNCHER must be deepspeed, torchrun or python; got '$LAUNCHER'" >&2; exit 2 ;;
    esac
    echo "global batch $(( NUM_GPUS * PER_DEVICE_BATCH * GRAD_ACCUM )) = $NUM_GPUS GPUs x $PER_DEVICE_BATCH x $GRAD_ACCUM accumulation ($LAUNCHER)" >&2
    "${cmd[@]}" "${ds_flags[@]}" "$@"
}
