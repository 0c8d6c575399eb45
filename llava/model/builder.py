"""load_pretrained_model(): LLaVA's loader, deciding by the checkpoint's config, never by its folder name."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llava.model import LlavaLlamaForCausalLM, PmodLlavaLlamaForCausalLM
from llava.model.checkpoint_config import CheckpointConfigError, load_checkpoint_config
from llava.model.llava_arch import load_projector_weights
from llava.model.lora import is_lora_folder, load_lora_model, lora_base, lora_config
from llava.model.multimodal_encoder.clip_encoder import resolve_tower_path
from llava.model.quantization import bnb_config
from llava.model.reduce import apply_reducer
from llava.model.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

MULTIMODAL_CLASSES = {"llava_llama": LlavaLlamaForCausalLM, "pmod_llava_llama": PmodLlavaLlamaForCausalLM}
TOWER_PREFIX = "model.vision_tower."


def default_dtype(device: str) -> torch.dtype:
    """float16 on GPUs (LLaVA's default for inference), float32 on CPU (half precision is very slow there)."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def load_pretrained_model(
    model_path: str,
    model_base: str | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map=None,
    device: str = "cpu",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
    vision_tower_path: str | None = None,
    overwrite_config: dict | None = None,
    reducer: str | None = None,
    **kwargs,
):
    """Return (tokenizer, model, image_processor, context_len) for a LLaVA / p-MoD / plain LLM checkpoint.

    ``model_name`` is accepted for compatibility with LLaVA's signature and ignored: the config decides.
    With ``model_base``, ``model_path`` is a stage-1 folder (config + ``mm_projector.bin``) or a LLaVA-style
    LoRA folder (``llava.model.lora``, merged on load) applied to the base LLM. ``vision_tower_path`` overrides the tower named in the config (e.g. a local copy of a hub tower);
    ``overwrite_config`` sets config values before the model is built (lmms-eval's ``customized_config``).
    ``reducer`` (e.g. ``fastv_k2_keep0.25``, see ``pmod.reducers``) applies a training-free vision-token reducer
    to a dense LLaVA checkpoint.
    ``load_8bit`` / ``load_4bit`` quantise the LLM's linear layers with bitsandbytes (CUDA only).
    """
    if load_8bit and load_4bit:
        raise ValueError("choose one of --load-8bit and --load-4bit")
    dtype = _as_dtype(dtype) or default_dtype(device)
    model_path = str(model_path)
    lora = is_lora_folder(model_path)
    config = lora_config(model_path)[0] if lora else load_checkpoint_config(model_path)
    for key, value in (overwrite_config or {}).items():
        setattr(config, key, value)
    _resolve_tower(config, model_path, vision_tower_path)
    load_kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    if load_8bit or load_4bit:
        bits = 8 if load_8bit else 4
        load_kwargs["quantization_config"] = bnb_config(bits, dtype, f"--load-{bits}bit")
        device_map = device_map or {"": device}
    if device_map is not None:
        load_kwargs["device_map"] = device_map

    model_class = MULTIMODAL_CLASSES.get(config.model_type)
    if lora:
        if model_class is None:
            raise CheckpointConfigError(f"{model_path}: a LoRA folder whose config is not a LLaVA / p-MoD one")
        tokenizer_source = lora_base(model_path, model_base)
        model = load_lora_model(model_path, tokenizer_source, model_class, config, load_kwargs)
    elif model_base is not None:
        model = _load_projector_checkpoint(model_path, model_base, config, model_class, load_kwargs)
        tokenizer_source = model_base
    elif model_class is not None:
        model, info = model_class.from_pretrained(model_path, config=config, output_loading_info=True, **load_kwargs)
        if any(key.startswith(TOWER_PREFIX) for key in info["missing_keys"]):
            logger.info("Checkpoint carries no vision tower weights; loading them from %s", config.mm_vision_tower)
            model.get_vision_tower().load_pretrained_weights()
        tokenizer_source = model_path
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_path, config=config, **load_kwargs)
        except ValueError as error:
            raise CheckpointConfigError(
                f"{model_path}: not a LLaVA, p-MoD or causal-LM checkpoint ({error})"
            ) from error
        tokenizer_source = model_path
    if device_map is None:
        model.to(device)
    model.eval()
    if reducer:
        model = apply_reducer(model, reducer)

    image_processor = None
    if model_class is not None:
        tower = model.get_vision_tower()
        tower.to(device=model.device, dtype=dtype)
        image_processor = tower.image_processor
    context_len = getattr(config, "tokenizer_model_max_length", None) or getattr(config, "max_position_embeddings", 2048)
    return load_tokenizer(tokenizer_source, use_fast=True), model, image_processor, context_len


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    return getattr(torch, str(dtype).replace("torch.", ""))


def _resolve_tower(config, model_path: str, override: str | None) -> None:
    """Point ``mm_vision_tower`` at a local folder when the stored name is relative to the checkpoint."""
    name = override or getattr(config, "mm_vision_tower", None)
    if name:
        checkpoint = Path(model_path)
        config.mm_vision_tower = resolve_tower_path(name, (checkpoint, checkpoint.parent))


def _load_projector_checkpoint(model_path, model_base, config, model_class, load_kwargs):
    projector_file = Path(model_path) / "mm_projector.bin"
    if model_class is None or not projector_file.is_file():
        raise ValueError(
            f"model_base was given, so {model_path} must be a stage-1 folder with a LLaVA config and mm_projector.bin"
        )
    model = model_class.from_pretrained(model_base, config=config, **load_kwargs)
    model.get_vision_tower().load_pretrained_weights()
    load_projector_weights(model.get_model().mm_projector, projector_file)
    return model
