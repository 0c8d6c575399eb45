"""Merge a LLaVA-style LoRA folder into a full checkpoint (LLaVA's `scripts/merge_lora_weights.py`).

    python -m llava.model.merge_lora --model-path checkpoints/llava-lora --model-base lmsys/vicuna-7b-v1.5 \\
        --save-model-path checkpoints/llava-merged

`--model-path` may be a final LoRA folder or an intermediate `checkpoint-N` of a LoRA run. The result loads
like any full checkpoint (tokenizer from the base LLM included).
"""

from __future__ import annotations

import argparse

import torch

from llava.serve.common import run_cli


def main(argv=None) -> None:
    from llava.model.builder import load_pretrained_model
    from llava.model.lora import is_lora_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", "--model_path", dest="model_path", required=True)
    parser.add_argument("--model-base", "--model_base", dest="model_base", default=None,
                        help="the LLM the LoRA run started from (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--save-model-path", "--save_model_path", dest="save_model_path", required=True)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="dtype of the merged weights (default float16, as LLaVA saves them)")
    args = parser.parse_args(argv)
    if not is_lora_folder(args.model_path):
        parser.error(f"--model-path {args.model_path}: no adapter_config.json there (not a LoRA folder)")
    tokenizer, model, _, _ = load_pretrained_model(args.model_path, args.model_base, device="cpu",
                                                   dtype=getattr(torch, args.dtype))
    model.config.use_cache = True
    model.save_pretrained(args.save_model_path)
    tokenizer.save_pretrained(args.save_model_path)
    print(f"merged {args.model_path} into {args.save_model_path}")


if __name__ == "__main__":
    run_cli(main)
