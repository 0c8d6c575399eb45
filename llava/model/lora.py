"""LLaVA-style LoRA folders, loaded onto their base LLM and merged.

The layout is LLaVA's (what its LoRA training writes, and what ours writes into ``lora_adapter/`` and every
``checkpoint-N/``): ``adapter_config.json`` + ``adapter_model.{safetensors,bin}`` (the LoRA weights),
``non_lora_trainables.{safetensors,bin}`` (projector, p-MoD routers, ``image_newline``: trained in full, not
by LoRA) and ``config.json`` (the LLaVA / p-MoD config; an intermediate ``checkpoint-N`` may lack it, then the
run folder above it has it). The base LLM comes from ``--model-base`` (or the adapter's
``base_model_name_or_path``), the vision tower from the config's tower name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from peft import PeftModel
from safetensors.torch import load_file

from llava.model.checkpoint_config import CheckpointConfigError, load_checkpoint_config
from pmod.settings import MOD_CONFIG_KEYS

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
NON_LORA_FILES = ("non_lora_trainables.safetensors", "non_lora_trainables.bin")
PEFT_PREFIX = "base_model.model."


def is_lora_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def lora_base(path: str | Path, model_base: str | None) -> str:
    """``--model-base``, else the base LLM the adapter names; an error when neither is known."""
    if model_base:
        return str(model_base)
    named = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not named:
        raise CheckpointConfigError(f"{path} is a LoRA folder: pass --model-base (the LLM it was trained on)")
    return named


def lora_config(path: str | Path):
    """The LLaVA / p-MoD config of a LoRA folder, or of the run folder above an intermediate checkpoint-N."""
    path = Path(path)
    for folder in (path, path.parent):
        if (folder / "config.json").is_file():
            return load_checkpoint_config(str(folder)), folder
    raise CheckpointConfigError(f"{path}: a LoRA folder without config.json (neither there nor in {path.parent})")


def load_lora_model(path: str | Path, model_base: str, model_class, config, load_kwargs: dict):
    """The base LLM in ``model_class`` with the LoRA folder's vision modules, routers and adapter merged in."""
    settings = {k: v for k, v in config.to_dict().items()
                if k not in (*MOD_CONFIG_KEYS, "mod_target_layer_indices", "model_type")}
    model = model_class.from_pretrained(model_base, config=model_class.config_class.from_dict(settings),
                                        **load_kwargs)
    if getattr(config, "mod_target_layers", None) is not None:
        model.get_model().initialize_mod_modules(SimpleNamespace(**{k: getattr(config, k) for k in MOD_CONFIG_KEYS}))
    model.get_vision_tower().load_pretrained_weights()
    load_non_lora_trainables(model, Path(path))
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    logger.info("Merged the LoRA adapter of %s into %s", path, model_base)
    return model


def load_non_lora_trainables(model: torch.nn.Module, folder: Path) -> None:
    """Projector, routers and image_newline from the folder (LLaVA's prefixes stripped); names must match."""
    file = next((folder / name for name in NON_LORA_FILES if (folder / name).is_file()), None)
    if file is None:
        raise CheckpointConfigError(f"{folder}: a LoRA folder without {' or '.join(NON_LORA_FILES)} (the projector)")
    tensors = load_file(file) if file.suffix == ".safetensors" else torch.load(file, map_location="cpu",
                                                                                  weights_only=True)
    tensors = {name.removeprefix(PEFT_PREFIX): value for name, value in tensors.items()}
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise CheckpointConfigError(f"{file}: tensors the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(params[name].dtype))
