"""Files written the way the LLaVA releases write them, on tiny weights (for the release-loading tests).

- a SentencePiece ``tokenizer.model`` with ``tokenizer_config.json`` (LlamaTokenizer, legacy false) and no
  ``tokenizer.json``, as LLaVA and Vicuna ship them;
- ``config.json`` exactly as liuhaotian LLaVA-1.5 / 1.6 wrote it (``model_type: llava``, LLaVA-code architecture
  name, hub tower name, ``mm_*`` keys, old ``transformers_version``), sharded weights (1.5: ``.bin``, float16,
  no tower; 1.6: safetensors, bfloat16, fine-tuned tower included);
- a hub-cache entry for ``openai/clip-vit-large-patch14-336`` holding the tiny tower, so the hub name in a
  release config resolves offline as it does on a user's machine with that tower downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from llava.tiny_models import training_corpus

HUB_TOWER = "openai/clip-vit-large-patch14-336"
SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def write_sentencepiece_tokenizer(folder: Path, vocab_size: int = 400, model_max_length: int = 2048) -> Path:
    """Train a tiny Llama-style SentencePiece BPE (byte fallback, ids 0/1/2 = unk/bos/eos) into ``folder``."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_corpus()), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True, minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": model_max_length, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", **{key: added_token(value) for key, value in SPECIAL.items()},
    }, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({**SPECIAL, "pad_token": "<unk>"}, indent=2))
    return folder


def write_hub_tower(hub_cache: Path, tower_folder: str, repo_id: str = HUB_TOWER) -> None:
    """A huggingface_hub cache entry for ``repo_id`` whose snapshot is a copy of ``tower_folder``."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    shutil.copytree(tower_folder, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)


def release_config(ours: dict, version: str) -> dict:
    """The liuhaotian config of LLaVA-``version`` with the tiny model's sizes."""
    config = {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5" if version == "1.5" else "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": ours["hidden_size"],
        "image_aspect_ratio": "pad", "initializer_range": 0.02, "intermediate_size": ours["intermediate_size"],
        "max_length": 4096, "max_position_embeddings": 4096, "mm_hidden_size": ours["mm_hidden_size"],
        "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": HUB_TOWER, "model_type": "llava",
        "num_attention_heads": ours["num_attention_heads"], "num_hidden_layers": ours["num_hidden_layers"],
        "num_key_value_heads": ours["num_key_value_heads"], "pad_token_id": 0, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.31.0", "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False, "use_cache": True, "use_mm_proj": True, "vocab_size": ours["vocab_size"],
    }
    if version == "1.6":
        tile = 56
        del config["max_length"]
        config.update({
            "attention_bias": False, "freeze_mm_vision_resampler": False, "image_aspect_ratio": "anyres",
            "image_crop_resolution": 224, "image_split_resolution": 224, "mm_patch_merge_type": "spatial_unpad",
            "image_grid_pinpoints": [[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile], [3 * tile, tile],
                                     [tile, 3 * tile]],
            "mm_vision_tower_lr": 2e-06, "rope_theta": 10000.0, "tokenizer_model_max_length": 4096,
            "tokenizer_padding_side": "right", "torch_dtype": "bfloat16", "transformers_version": "4.36.2",
            "unfreeze_mm_vision_tower": True,
        })
    return config


def write_release(folder: Path, state: dict[str, torch.Tensor], config: dict, tokenizer_folder: Path) -> Path:
    """Weights in two shards with an index (1.5: float16 .bin without the tower; 1.6: bfloat16 safetensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    safetensors = config["transformers_version"] != "4.31.0"
    dtype = torch.bfloat16 if safetensors else torch.float16
    if not config["unfreeze_mm_vision_tower"]:
        state = {key: value for key, value in state.items() if not key.startswith("model.vision_tower.")}
    keys = sorted(state)
    shards = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        tensors = {key: state[key].to(dtype).contiguous() for key in shard}
        if safetensors:
            name = f"model-0000{number}-of-00002.safetensors"
            save_file(tensors, folder / name, metadata={"format": "pt"})
        else:
            name = f"pytorch_model-0000{number}-of-00002.bin"
            torch.save(tensors, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    index = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
         "transformers_version": config["transformers_version"]}, indent=2))
    for item in tokenizer_folder.iterdir():
        shutil.copy(item, folder / item.name)
    return folder
