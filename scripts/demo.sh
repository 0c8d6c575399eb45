#!/usr/bin/env bash
# Tiny end-to-end run on a CPU in a few minutes, with nothing to download: build a tiny CLIP tower and a tiny
# Llama, write a small synthetic LLaVA-JSON data set, run stage 1 (scripts/pretrain.sh) and stage 2
# (scripts/finetune.sh) on them, then load the result and generate. Output goes to DEMO_DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEMO_DIR=${DEMO_DIR:-demo_output}
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-20}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false

mkdir -p "$DEMO_DIR"
"$PYTHON" -m llava.tiny_models --out "$DEMO_DIR/models" >/dev/null
"$PYTHON" - "$DEMO_DIR/data" <<'PY'
"""A synthetic data set: solid-colour images, captions for stage 1, short conversations for stage 2."""
import json
import sys
from pathlib import Path

from PIL import Image

root = Path(sys.argv[1])
(root / "images").mkdir(parents=True, exist_ok=True)
colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
pretrain, instruct = [], []
for i in range(32):
    name, rgb = list(colors.items())[i % len(colors)]
    path = f"{name}_{i}.png"
    Image.new("RGB", (48 + 8 * (i % 4), 64 - 8 * (i % 3)), rgb).save(root / "images" / path)
    pretrain.append({"id": f"p{i}", "image": path, "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."},
        {"from": "gpt", "value": f"a {name} picture"}]})
    instruct.append({"id": f"i{i}", "image": path, "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the picture?"},
        {"from": "gpt", "value": f"The picture is {name}."}]})
for i in range(8):
    instruct.append({"id": f"t{i}", "conversations": [
        {"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello!"}]})
(root / "pretrain.json").write_text(json.dumps(pretrain))
(root / "instruct.json").write_text(json.dumps(instruct))
PY

export LAUNCHER=python PYTHON NUM_GPUS=1 GLOBAL_BATCH=4 PER_DEVICE_BATCH=4 MAX_STEPS="$STEPS" NUM_WORKERS=0
export MODEL="$DEMO_DIR/models/tiny-llama" VISION_TOWER="$DEMO_DIR/models/tiny-clip"
export IMAGE_FOLDER="$DEMO_DIR/data/images" MODEL_MAX_LENGTH=256 GRADIENT_CHECKPOINTING=False
export PRECISION_FLAGS="--bf16 False --tf32 False" SAVE_STEPS=1000

DATA_PATH="$DEMO_DIR/data/pretrain.json" OUTPUT_DIR="$DEMO_DIR/pretrain" \
    bash scripts/pretrain.sh --logging_steps 5
DATA_PATH="$DEMO_DIR/data/instruct.json" OUTPUT_DIR="$DEMO_DIR/finetune" \
    PRETRAIN_ADAPTER="$DEMO_DIR/pretrain/mm_projector.bin" LR=1e-3 \
    bash scripts/finetune.sh --logging_steps 5

"$PYTHON" - "$DEMO_DIR/finetune" <<'PY'
"""Load the stage-2 model with the public loader and answer one question about a red image."""
import sys

import torch
from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model

tokenizer, model, image_processor, _ = load_pretrained_model(sys.argv[1], None, None, device="cpu")
conv = get_conv_template("vicuna_v1")
conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\nWhat color is the picture?")
conv.append_message(conv.roles[1], None)
input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt").unsqueeze(0)
image = Image.new("RGB", (56, 56), (220, 30, 30))
images = process_images([image], image_processor, model.config).to(model.dtype)
with torch.inference_mode():
    output = model.generate(input_ids, images=images, image_sizes=[image.size], max_new_tokens=8,
                            do_sample=False, attention_mask=torch.ones_like(input_ids))
print("model:", sys.argv[1])
print("answer:", tokenizer.decode(output[0], skip_special_tokens=True))
PY
