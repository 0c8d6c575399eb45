# Shared by the stage scripts (sourced, not run): GPU count, gradient accumulation that keeps the global batch
# constant, the launcher (deepspeed, torchrun or python), and `common_flags`, the optimisation and bookkeeping
# flags every LLaVA recipe passes the same way. Expects GLOBAL_BATCH, PER_DEVICE_BATCH, OUTPUT_DIR, LR and
# SAVE_STEPS from the caller; the other variables below default to the LLaVA-1.5 values.
#
# Several nodes (NUM_GPUS is per node; the global batch stays GLOBAL_BATCH):
#   torchrun: run the script on every node with NNODES, NODE_RANK, MASTER_ADDR (node 0's address), MASTER_PORT.
#   deepspeed: HOSTFILE (lines "host slots=N"; NNODES defaults to its host count) and MASTER_ADDR; the launcher
#   starts every node over ssh from node 0, or, with NO_SSH=1, run the script on every node with its NODE_RANK.

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${NUM_GPUS:-}" ]]; then
    NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    (( NUM_GPUS > 0 )) || NUM_GPUS=1
fi
LAUNCHER=${LAUNCHER:-deepspeed}
TRAIN_MODULE=${TRAIN_MODULE:-llava.train.train}  # llava.train.train_hf for transformers-native VLMs
MASTER_PORT=${MASTER_PORT:-29501}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
NODE_RANK=${NODE_RANK:-0}
if [[ -n "${HOSTFILE:-}" ]]; then
    [[ "$LAUNCHER" == deepspeed ]] || { echo "HOSTFILE is for LAUNCHER=deepspeed; torchrun takes NNODES/NODE_RANK" >&2; exit 2; }
    [[ -f "$HOSTFILE" ]] || { echo "HOSTFILE=$HOSTFILE: no such file" >&2; exit 2; }
    NNODES=${NNODES:-$(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE")}
fi
NNODES=${NNODES:-1}
if (( NNODES > 1 )) && [[ "$LAUNCHER" == python ]]; then
    echo "NNODES=$NNODES needs LAUNCHER=torchrun or deepspeed" >&2
    exit 2
fi
if (( NODE_RANK < 0 || NODE_RANK >= NNODES )); then
    echo "NODE_RANK=$NODE_RANK must be in [0, NNODES=$NNODES)" >&2
    exit 2
fi

if [[ -z "${GRAD_ACCUM:-}" ]]; then
    per_step=$(( NNODES * NUM_GPUS * PER_DEVICE_BATCH ))
    if (( GLOBAL_BATCH % per_step != 0 )); then
        nodes_factor=""
        (( NNODES > 1 )) && nodes_factor="NNODES=$NNODES x "
        echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of ${nodes_factor}NUM_GPUS=$NUM_GPUS x PER_DEVICE_BATCH=$PER_DEVICE_BATCH; set GRAD_ACCUM" >&2
        exit 2
    fi
    GRAD_ACCUM=$(( GLOBAL_BATCH / per_step ))
fi

EPOCHS=${EPOCHS:-1}
MAX_STEPS=${MAX_STEPS:--1}
MODEL_MAX_LENGTH=${MODEL_MAX_LENGTH:-2048}
PRECISION_FLAGS=${PRECISION_FLAGS:---bf16 True --tf32 True}
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-True}
NUM_WORKERS=${NUM_WORKERS:-4}
REPORT_TO=${REPORT_TO:-none}
ATTN_IMPL=${ATTN_IMPL:-auto}
PACKING=${PACKING:-False}
read -r -a precision_flags <<< "$PRECISION_FLAGS"
common_flags=(
    "${precision_flags[@]}"
    --output_dir "$OUTPUT_DIR"
    --num_train_epochs "$EPOCHS"
    --max_steps "$MAX_STEPS"
    --per_device_train_batch_size "$PER_DEVICE_BATCH"
    --per_device_eval_batch_size 4
    --gradient_accumulation_steps "$GRAD_ACCUM"
    --eval_strategy no
    --save_strategy steps
    --save_steps "$SAVE_STEPS"
    --save_total_limit 1
    --learning_rate "$LR"
    --weight_decay 0.
    --warmup_steps 0.03
    --lr_scheduler_type cosine
    --logging_steps 1
    --model_max_length "$MODEL_MAX_LENGTH"
    --gradient_checkpointing "$GRADIENT_CHECKPOINTING"
    --dataloader_num_workers "$NUM_WORKERS"
    --lazy_preprocess True
    --report_to "$REPORT_TO"
    --attn_implementation "$ATTN_IMPL"
    --packing "$PACKING"
)

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
    local nodes=""
    case "$LAUNCHER" in
        deepspeed)
            cmd=(deepspeed --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
            if [[ -n "${HOSTFILE:-}" ]]; then
                cmd+=(--hostfile "$HOSTFILE" --num_nodes "$NNODES" --master_addr "$MASTER_ADDR")
                [[ "${NO_SSH:-0}" == 1 ]] && cmd+=(--no_ssh --node_rank "$NODE_RANK")
            fi
            cmd+=(--module "$TRAIN_MODULE") ;;
        torchrun) cmd=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NUM_GPUS"
                       --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m "$TRAIN_MODULE") ;;
        python) cmd=("${PYTHON:-python}" -m "$TRAIN_MODULE") ;;
        *) echo "LAUNCHER must be deepspeed, torchrun or python; got '$LAUNCHER'" >&2; exit 2 ;;
    esac
    (( NNODES > 1 )) && nodes="$NNODES nodes x "
    echo "global batch $(( NNODES * NUM_GPUS * PER_DEVICE_BATCH * GRAD_ACCUM )) = $nodes$NUM_GPUS GPUs x $PER_DEVICE_BATCH x $GRAD_ACCUM accumulation ($LAUNCHER)" >&2
    if [[ "${DRY_RUN:-0}" == 1 ]]; then  # print the command instead of running it
        printf '%q ' "${cmd[@]}" "${ds_flags[@]}" "$@"
        echo
        return 0
    fi
    "${cmd[@]}" "${ds_flags[@]}" "$@"
}

# Stage-2 model and data flags shared by the finetune*.sh recipes. Call after setting MODEL, DATA_PATH,
# IMAGE_FOLDER, VISION_TOWER, PRETRAIN_ADAPTER and IMAGE_ASPECT_RATIO; fills the array `stage2_flags`.
set_stage2_flags() {
    stage2_flags=(
        --model_name_or_path "$MODEL"
        --version v1
        --data_path "$DATA_PATH"
        --image_folder "$IMAGE_FOLDER"
        --vision_tower "$VISION_TOWER"
        --pretrain_mm_mlp_adapter "$PRETRAIN_ADAPTER"
        --mm_projector_type mlp2x_gelu
        --mm_vision_select_layer -2
        --mm_use_im_start_end False
        --mm_use_im_patch_token False
        --image_aspect_ratio "$IMAGE_ASPECT_RATIO"
        --group_by_modality_length True
    )
}

# The official p-MoD flags; defaults are the paper's recipe (finetune_pmod*.sh pass them).
pmod_flags=(
    --mod_target_layers "${MOD_TARGET_LAYERS:-shiftedcos_decay_0.85_0.15}"
    --mod_target_token_type "${MOD_TARGET_TOKEN_TYPE:-vision_all}"
    --mod_router_factor "${MOD_ROUTER_FACTOR:-0.5}"
    --mod_weight_norm "${MOD_WEIGHT_NORM:-tanh_0.2_1}"
    --mod_bias_enabled "${MOD_BIAS_ENABLED:-True}"
    --mod_special_init "${MOD_SPECIAL_INIT:-True}"
)
