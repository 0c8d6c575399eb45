"""Stage-2 fine-tuning of transformers' own VLMs (LLaVA-HF, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL),
dense or p-MoD, on LLaVA-format JSON: ``python -m llava.train.train_hf`` (``scripts/finetune_pmod_<family>.sh``).

The sibling of ``llava.train.train``: the same Trainer (LLaVATrainer), training flags, DeepSpeed and LoRA
plumbing; data through the model's own processor and chat template (``llava.train.hf_data``). The official
``--mod_*`` flags make a dense checkpoint p-MoD (zero-initialised routers by ``--mod_special_init``); a
checkpoint saved with p-MoD settings is trained as it is. The vision tower stays frozen; the projector,
the language model and the routers train (LoRA: adapters on the language model's linears, merged at the end).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoProcessor

from llava.train.hf_data import ChatCollator, ChatDataset
from llava.train.llava_trainer import LLaVATrainer, end_distributed, gathered, is_peft_model
from llava.train.train import (
    TrainingArguments,
    compute_dtype_of,
    configure_reporting,
    find_resume_checkpoint,
    parse_dataclasses,
    resolve_attn_implementation,
)
from pmod.hf import apply_pmod, has_pmod_settings, load_vlm, pmod_settings
from pmod.hf.families import visual_token_ids
from pmod.schedule import parse_schedule
from pmod.settings import MOD_CONFIG_KEYS
from pmod.weight_norm import parse_weight_norm

logger = logging.getLogger(__name__)
VISION_MODULES = ("vision_tower", "visual")  # LLaVA families / Qwen-VL
PROJECTORS = ("multi_modal_projector", "merger")  # Qwen-VL's projector (merger) sits inside its `visual` module
NOT_LORA_TARGETS = ("vision_tower", "visual", "multi_modal_projector", "router", "lm_head")


def _has_part(name: str, parts: tuple[str, ...]) -> bool:
    return any(f".{part}." in f".{name}" for part in parts)


def is_frozen(name: str) -> bool:
    """Vision-tower parameters stay frozen; the projector, the language model and the routers train."""
    return _has_part(name, VISION_MODULES) and not _has_part(name, PROJECTORS)


@dataclass
class HFModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "a transformers VLM folder or hub id"})
    mod_target_layers: str | None = field(default=None, metadata={"help": "p-MoD schedule; unset = keep as is"})
    mod_router_factor: float = 0.5
    mod_weight_norm: str = "tanh_0.2_1"
    mod_bias_enabled: bool = True
    mod_special_init: bool = True
    mod_target_token_type: str = "vision_all"


@dataclass
class HFDataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA-format JSON list of conversations"})
    image_folder: str | None = None
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for LLaVA's scripts; always lazy"})


def parse_args(argv=None):
    model_args, data_args, training_args = parse_dataclasses((HFModelArguments, HFDataArguments, TrainingArguments),
                                                             argv)
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required")
    if not data_args.data_path:
        raise ValueError("--data_path is required")
    if model_args.mod_target_layers:
        parse_weight_norm(model_args.mod_weight_norm)
    if training_args.group_by_modality_length:
        raise ValueError("--group_by_modality_length is not supported by llava.train.train_hf")
    if training_args.packing:
        raise ValueError("--packing True is built for the LLaVA models (llava.train.train); llava.train.train_hf "
                         "trains transformers' own VLMs on padded batches")
    return model_args, data_args, training_args


def flag_settings(model_args: HFModelArguments) -> dict:
    """The ``mod_*`` settings the flags ask for, as a saved config holds them (the init flag aside)."""
    return {key: getattr(model_args, key) for key in MOD_CONFIG_KEYS if key != "mod_special_init"}


def load_model(model_args: HFModelArguments, training_args: TrainingArguments, dtype: torch.dtype):
    """The checkpoint as saved (p-MoD when its config says so, then the ``--mod_*`` flags must agree), or a dense
    checkpoint made p-MoD by the flags."""
    kwargs = dict(dtype=dtype, attn_implementation=resolve_attn_implementation(training_args.attn_implementation))
    config = transformers.AutoConfig.from_pretrained(model_args.model_name_or_path)
    model = load_vlm(model_args.model_name_or_path, **kwargs)
    if not model_args.mod_target_layers:
        return model
    flags = flag_settings(model_args)
    if has_pmod_settings(config):
        saved = pmod_settings(model)
        differ = sorted(key for key, value in flags.items() if saved[key] != value)
        if differ:
            raise ValueError(f"{model_args.model_name_or_path} is a p-MoD checkpoint whose settings differ from the "
                             f"flags: " + ", ".join(f"--{key} {flags[key]} (saved: {saved[key]})" for key in differ))
        return model
    parse_schedule(model_args.mod_target_layers, model_args.mod_router_factor,
                   config.get_text_config().num_hidden_layers)
    apply_pmod(model, schedule=model_args.mod_target_layers, router_factor=model_args.mod_router_factor,
               weight_norm=model_args.mod_weight_norm, bias=model_args.mod_bias_enabled,
               zero_init=model_args.mod_special_init, target=model_args.mod_target_token_type)
    return model


def configure_trainable(model, training_args: TrainingArguments):
    """Freeze the vision tower; LoRA wraps the language model's linears (routers, projector train in full)."""
    for name, param in model.named_parameters():
        param.requires_grad_(not is_frozen(name))
    model.config.use_cache = False
    if not training_args.lora_enable:
        return model
    targets = sorted(name for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and not any(part in name for part in NOT_LORA_TARGETS))
    lora = LoraConfig(r=training_args.lora_r, lora_alpha=training_args.lora_alpha,
                      lora_dropout=training_args.lora_dropout, bias=training_args.lora_bias, target_modules=targets)
    peft_model = get_peft_model(model, lora)
    for name, param in peft_model.named_parameters():
        if _has_part(name, ("router",) + PROJECTORS):
            param.requires_grad_(True)
    return peft_model


def save_final(trainer: LLaVATrainer, processor, training_args: TrainingArguments) -> None:
    """The trained model (LoRA merged) with its p-MoD settings and routers, and the processor."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    base = model.get_base_model() if is_peft_model(model) else model
    base.config.use_cache = True
    output_dir = training_args.output_dir
    if not is_peft_model(model):
        trainer.save_model(output_dir)  # gathers ZeRO-3 shards
    else:
        with gathered(list(model.parameters())):
            if training_args.should_save:
                model.merge_and_unload().save_pretrained(output_dir)
    if training_args.should_save:
        processor.save_pretrained(output_dir)
        logger.info("Saved %s to %s", type(base).__name__, output_dir)


def train(argv=None) -> None:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    configure_reporting(training_args)
    if training_args.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    processor.tokenizer.padding_side = "right"
    model = load_model(model_args, training_args, compute_dtype_of(training_args))
    dataset = ChatDataset(data_args.data_path, data_args.image_folder, processor)
    collator = ChatCollator(processor, set(visual_token_ids(model.config)),
                           image_in_every_batch=training_args.world_size > 1)
    model = configure_trainable(model, training_args)
    trainer = LLaVATrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator)
    trainer.train(resume_from_checkpoint=find_resume_checkpoint(training_args))
    trainer.save_state()
    save_final(trainer, processor, training_args)
    end_distributed(trainer)


if __name__ == "__main__":
    train()
