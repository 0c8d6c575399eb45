"""Training entry point with LLaVA's flags plus the official p-MoD ``--mod_*`` flags.

Run it as ``python -m llava.train.train``, with ``torchrun`` or with the ``deepspeed`` launcher. Stage 1
(``--tune_mm_mlp_adapter True``) trains the projector only; stage 2 trains the LLM and the projector (and the
p-MoD routers), with the vision tower frozen; ``--lora_enable`` trains LoRA adapters instead of the LLM.
Every flag is checked before a model is built, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from dataclasses import dataclass, field

import torch
import transformers

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers.utils import is_flash_attn_2_available

from llava.conversation import get_conv_template
from llava.mm_utils import anyres_grid_pinpoints, grid_pinpoints_from_flag, is_anyres
from llava.model import LlavaLlamaForCausalLM, PmodLlavaLlamaForCausalLM  # also registers the config types
from llava.model.checkpoint_config import load_checkpoint_config
from llava.model.quantization import bnb_config
from llava.model.tokenizer import load_tokenizer
from llava.train.dataset import make_supervised_data_module
from llava.train.llava_trainer import (
    NON_LORA_FILE,
    LLaVATrainer,
    end_distributed,
    gathered,
    is_peft_model,
    load_partial_state,
)
from pmod.hf_compat import current_trainer_flags
from pmod.schedule import parse_schedule
from pmod.weight_norm import parse_weight_norm

logger = logging.getLogger(__name__)

MOD_TOKEN_TYPES = ("vision_all", "vision_hr", "all")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
LORA_BIASES = ("none", "all", "lora_only")
NOT_LORA_TARGETS = ("mm_projector", "vision_tower", "vision_resampler", "router", "lm_head")
# Modules the LLM checkpoint does not have: trained in full under LoRA and under --freeze_backbone.
NEW_MODULES = ("mm_projector", "router", "image_newline")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "base LLM (or LLaVA checkpoint) folder or hub id"})
    version: str = field(default="v1", metadata={"help": "conversation template: plain (stage 1), v1 / vicuna_v1 (stage 2)"})
    freeze_backbone: bool = False
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    vision_tower: str | None = None
    mm_vision_select_layer: int = -1
    mm_vision_select_feature: str = "patch"
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "mm_projector.bin from stage 1"})
    mm_projector_type: str = "linear"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    mm_patch_merge_type: str = "flat"
    unfreeze_mm_vision_tower: bool = field(
        default=False, metadata={"help": "train the vision tower too (LLaVA-NeXT), at --mm_vision_tower_lr"}
    )
    mod_target_layers: str | None = field(
        default=None, metadata={"help": "p-MoD schedule, e.g. shiftedcos_decay_0.85_0.15; unset = dense LLaVA"}
    )
    mod_target_token_type: str | None = field(default=None, metadata={"help": "vision_all (default), vision_hr or all"})
    mod_router_factor: float = 0.5
    mod_weight_norm: str | None = field(default=None, metadata={"help": "router weight norm, e.g. tanh_0.2_1"})
    mod_bias_enabled: bool = False
    mod_special_init: bool = field(default=False, metadata={"help": "zero-initialise the routers"})

    @property
    def mod_enabled(self) -> bool:
        return bool(self.mod_target_layers)


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={"help": "LLaVA-format JSON list of conversations"})
    lazy_preprocess: bool = False
    is_multimodal: bool = False
    image_folder: str | None = None
    image_aspect_ratio: str = "square"
    max_num_sub_images: int = field(default=4, metadata={"help": "anyres: most tiles per image (p-MoD)"})
    image_grid_pinpoints: str | None = field(
        default=None, metadata={"help": "anyres canvases as LLaVA-NeXT writes them, instead of --max_num_sub_images"}
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = None
    optim: str = "adamw_torch"
    remove_unused_columns: bool = False
    freeze_mm_mlp_adapter: bool = False
    model_max_length: int = field(default=512, metadata={"help": "longest tokenized sequence (before image expansion)"})
    double_quant: bool = True
    quant_type: str = "nf4"
    bits: int = field(default=16, metadata={"help": "16, or 4 / 8 with bitsandbytes on a GPU"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_weight_path: str = field(default="", metadata={"help": "LoRA adapter folder to start from"})
    lora_bias: str = "none"
    mm_projector_lr: float | None = None
    mm_vision_tower_lr: float | None = None
    group_by_modality_length: bool = False
    packing: bool = field(default=False, metadata={
        "help": "padding-free batches: the samples of a batch run as one row after image expansion, and p-MoD "
                "layers run their kept tokens packed (needs sdpa or flash_attention_2)"})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "sdpa, eager, flash_attention_2, or auto (flash-attn when installed)"}
    )


def parse_dataclasses(types: tuple, argv=None):
    """Parse the flags into ``types``, with the installed release's trainer-flag names; on a machine without
    CUDA, DeepSpeed runs need ``use_cpu`` (gloo)."""
    argv = current_trainer_flags(sys.argv[1:] if argv is None else argv)
    if "--deepspeed" in argv and "--use_cpu" not in argv and not torch.cuda.is_available():
        argv += ["--use_cpu", "True"]
    return transformers.HfArgumentParser(types).parse_args_into_dataclasses(args=argv)


def parse_args(argv=None):
    """Parse the three dataclasses (ModelArguments, DataArguments, TrainingArguments) and check them."""
    model_args, data_args, training_args = parse_dataclasses((ModelArguments, DataArguments, TrainingArguments),
                                                             argv)
    if model_args.mod_enabled and model_args.mod_target_token_type is None:
        model_args.mod_target_token_type = "vision_all"
    # What the data side reads besides its own flags; the image settings are filled in once the tower exists.
    data_args.version = model_args.version
    data_args.mm_use_im_start_end = model_args.mm_use_im_start_end
    data_args.image_processor = None
    if isinstance(training_args.resume_from_checkpoint, str) and training_args.resume_from_checkpoint.lower() == "true":
        training_args.resume_from_checkpoint = True
    return model_args, data_args, training_args


def validate_args(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments):
    """Reject bad flags with a message naming the flag, before anything heavy happens. Returns the LLM config."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required")
    if not data_args.data_path or not os.path.isfile(data_args.data_path):
        raise ValueError(f"--data_path must be an existing JSON file, got {data_args.data_path!r}")
    if data_args.image_folder and not os.path.isdir(data_args.image_folder):
        raise ValueError(f"--image_folder {data_args.image_folder!r} is not a folder")
    try:
        get_conv_template(model_args.version)
    except (KeyError, ValueError) as err:
        raise ValueError(f"--version {model_args.version!r} is not a known conversation template: {err}") from err
    _check_choice("--attn_implementation", training_args.attn_implementation, ATTN_IMPLEMENTATIONS)
    _check_choice("--lora_bias", training_args.lora_bias, LORA_BIASES)
    if training_args.packing and training_args.attn_implementation == "eager":
        raise ValueError("--packing True needs --attn_implementation sdpa, flash_attention_2 or auto, not eager")
    _check_bits(training_args.bits)
    if model_args.tune_mm_mlp_adapter and training_args.lora_enable:
        raise ValueError("--tune_mm_mlp_adapter (stage 1) trains the projector only; it cannot be combined with --lora_enable")
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if getattr(model_args, flag):
            raise ValueError(f"--{flag} True is not supported (LLaVA-1.5, LLaVA-NeXT and p-MoD train with False)")
    if model_args.tune_mm_mlp_adapter and not model_args.vision_tower:
        raise ValueError("--tune_mm_mlp_adapter needs --vision_tower")
    if model_args.unfreeze_mm_vision_tower and (model_args.tune_mm_mlp_adapter or not model_args.vision_tower):
        raise ValueError("--unfreeze_mm_vision_tower is a stage-2 option and needs --vision_tower")
    if training_args.mm_vision_tower_lr is not None and not model_args.unfreeze_mm_vision_tower:
        raise ValueError("--mm_vision_tower_lr would be ignored: the vision tower is frozen unless "
                         "--unfreeze_mm_vision_tower True")
    if model_args.pretrain_mm_mlp_adapter and not os.path.isfile(model_args.pretrain_mm_mlp_adapter):
        raise ValueError(f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter!r} is not a file")
    _validate_image_args(model_args, data_args)
    config = _load_llm_config(model_args, training_args)
    if model_args.mod_enabled:
        _validate_mod_args(model_args, config)
    return config


def _check_choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{flag} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _check_bits(bits: int) -> None:
    _check_choice("--bits", bits, (4, 8, 16))
    if bits == 16:
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError(f"--bits {bits} needs bitsandbytes, which is not installed; use --bits 16") from err
    if not torch.cuda.is_available():
        raise ValueError(f"--bits {bits} needs a CUDA device; on CPU use --bits 16")


def _load_llm_config(model_args: ModelArguments, training_args: TrainingArguments):
    """The starting checkpoint's config: an LLM, one of ours, or a LLaVA release (``model_type: llava``)."""
    try:
        return load_checkpoint_config(model_args.model_name_or_path, cache_dir=training_args.cache_dir)
    except ValueError as err:
        raise ValueError(f"--model_name_or_path {model_args.model_name_or_path!r}: cannot read its config ({err})") from err


def _validate_image_args(model_args: ModelArguments, data_args: DataArguments) -> None:
    """AnyRes needs the spatial_unpad merge and a supported tile budget; other aspect modes are square / pad."""
    if not is_anyres(data_args.image_aspect_ratio):
        _check_choice("--image_aspect_ratio", data_args.image_aspect_ratio, ("square", "pad", "anyres", "anyres_max_N"))
        if data_args.image_grid_pinpoints:
            raise ValueError("--image_grid_pinpoints needs --image_aspect_ratio anyres")
        return
    if data_args.image_grid_pinpoints:
        grid_pinpoints_from_flag(data_args.image_grid_pinpoints, 1)
    merge = model_args.mm_patch_merge_type
    if not (merge.startswith("spatial") and "unpad" in merge):
        raise ValueError(f"--image_aspect_ratio {data_args.image_aspect_ratio} needs --mm_patch_merge_type "
                         f"spatial_unpad, got {merge!r}")
    anyres_grid_pinpoints(data_args.max_num_sub_images, 1)


def _validate_mod_args(model_args: ModelArguments, config) -> None:
    _check_choice("--mod_target_token_type", model_args.mod_target_token_type, MOD_TOKEN_TYPES)
    parse_schedule(model_args.mod_target_layers, model_args.mod_router_factor, config.num_hidden_layers)
    parse_weight_norm(model_args.mod_weight_norm)
    if not (model_args.vision_tower or getattr(config, "mm_vision_tower", None)):
        raise ValueError("p-MoD routes vision tokens: --mod_target_layers needs --vision_tower")


def resolve_attn_implementation(requested: str) -> str:
    """``auto`` and an unavailable ``flash_attention_2`` fall back to SDPA (flash-attn is optional)."""
    if requested not in ("auto", "flash_attention_2"):
        return requested
    if is_flash_attn_2_available() and torch.cuda.is_available():
        return "flash_attention_2"
    if requested == "flash_attention_2":
        logger.warning("flash_attention_2 requested but flash-attn is not usable here; using sdpa")
    return "sdpa"


def uses_activation_checkpointing(training_args: TrainingArguments) -> bool:
    """transformers 5.x renamed --gradient_checkpointing to --activation_checkpointing; accept either."""
    return bool(getattr(training_args, "activation_checkpointing", None) or training_args.gradient_checkpointing)


def compute_dtype_of(training_args: TrainingArguments) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def quantization_kwargs(training_args: TrainingArguments, compute_dtype: torch.dtype) -> dict:
    """4/8-bit loading (QLoRA); routers, projector, tower and head stay in full precision."""
    if training_args.bits == 16:
        return {}
    config = bnb_config(training_args.bits, compute_dtype, f"--bits {training_args.bits}",
                        training_args.double_quant, training_args.quant_type)
    return {"quantization_config": config, "device_map": {"": training_args.device}}


def build_tokenizer(model_args: ModelArguments, training_args: TrainingArguments):
    tokenizer = load_tokenizer(
        model_args.model_name_or_path,
        cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length,
        padding_side="right",
    )
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is None:
            raise ValueError(f"the tokenizer of {model_args.model_name_or_path!r} has neither a pad nor an unk token")
        tokenizer.pad_token = tokenizer.unk_token  # LLaVA's choice for Vicuna
    return tokenizer


def build_model(model_args, data_args, training_args, compute_dtype, llm_config):
    """Load the LLM into the LLaVA (or p-MoD) class, attach the vision modules and the routers."""
    model_cls = PmodLlavaLlamaForCausalLM if model_args.mod_enabled else LlavaLlamaForCausalLM
    settings = {key: value for key, value in llm_config.to_dict().items() if key != "model_type"}
    model = model_cls.from_pretrained(
        model_args.model_name_or_path,
        config=model_cls.config_class.from_dict(settings),
        cache_dir=training_args.cache_dir,
        dtype=compute_dtype,
        attn_implementation=resolve_attn_implementation(training_args.attn_implementation),
        **quantization_kwargs(training_args, compute_dtype),
    )
    model.config.use_cache = False
    if training_args.bits in (4, 8):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=uses_activation_checkpointing(training_args)
        )
    if model_args.vision_tower:
        model.get_model().initialize_vision_modules(model_args)
        vision_tower = model.get_vision_tower()
        vision_tower.to(dtype=compute_dtype, device=training_args.device)
        vision_tower.requires_grad_(False)
        configure_multimodal(model, vision_tower, model_args, data_args, training_args)
    if model_args.mod_enabled:
        model.get_model().initialize_mod_modules(model_args)
    if training_args.packing:
        model.enable_sequence_packing()
        logger.info("--packing: every batch runs as one row of its samples (attention %s)",
                    model.config._attn_implementation)
    return model


def configure_multimodal(model, vision_tower, model_args, data_args, training_args) -> None:
    """Hand the image processor to the data side and record LLaVA's multimodal settings in the config."""
    data_args.image_processor = vision_tower.image_processor
    data_args.is_multimodal = True
    if data_args.image_aspect_ratio.startswith("anyres"):
        tile = vision_tower.image_processor.crop_size["height"]
        flag = data_args.image_grid_pinpoints
        data_args.image_grid_pinpoints = grid_pinpoints_from_flag(flag, tile) if flag else \
            anyres_grid_pinpoints(data_args.max_num_sub_images, tile)
    config = model.config
    config.image_aspect_ratio = data_args.image_aspect_ratio
    config.image_grid_pinpoints = data_args.image_grid_pinpoints
    config.max_num_sub_images = data_args.max_num_sub_images
    config.tokenizer_padding_side = "right"
    config.tokenizer_model_max_length = training_args.model_max_length
    config.conv_template = model_args.version  # inference picks the template the model was trained with
    config.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    config.unfreeze_mm_vision_tower = model_args.unfreeze_mm_vision_tower
    config.mm_vision_tower_lr = training_args.mm_vision_tower_lr
    config.freeze_mm_mlp_adapter = training_args.freeze_mm_mlp_adapter
    config.mm_use_im_start_end = model_args.mm_use_im_start_end
    config.mm_use_im_patch_token = model_args.mm_use_im_patch_token
    config.mm_projector_lr = training_args.mm_projector_lr
    config.mm_vision_tower_lr = training_args.mm_vision_tower_lr


def configure_trainable(model, model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """Stage 1: projector only. Stage 2: everything but the vision tower (unless unfrozen, and the backbone if
    frozen)."""
    if model_args.freeze_backbone:
        for name, param in model.get_model().named_parameters():
            param.requires_grad_(any(part in name for part in NEW_MODULES))
    if model_args.vision_tower:
        projector = model.get_model().mm_projector
        if model_args.tune_mm_mlp_adapter:
            model.requires_grad_(False)
            projector.requires_grad_(True)
        if training_args.freeze_mm_mlp_adapter:
            projector.requires_grad_(False)
        model.get_vision_tower().requires_grad_(model_args.unfreeze_mm_vision_tower)
    if uses_activation_checkpointing(training_args):
        model.enable_input_require_grads()


def lora_target_modules(model) -> list[str]:
    """Every nn.Linear of the LLM by full name: not the head, the projector, the vision tower or the routers."""
    return sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(part in name for part in NOT_LORA_TARGETS)
    )


def apply_lora(model, training_args: TrainingArguments, unfreeze_vision_tower: bool = False):
    """Wrap the LLM linears with LoRA; projector, routers, image_newline (and an unfrozen tower) train in full."""
    if training_args.lora_weight_path:
        model = PeftModel.from_pretrained(model, training_args.lora_weight_path, is_trainable=True)
        extra = os.path.join(training_args.lora_weight_path, NON_LORA_FILE)
    else:
        lora_config = LoraConfig(
            r=training_args.lora_r,
            lora_alpha=training_args.lora_alpha,
            target_modules=lora_target_modules(model),
            lora_dropout=training_args.lora_dropout,
            bias=training_args.lora_bias,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
        extra = None
    fully_trained = NEW_MODULES + (("vision_tower",) if unfreeze_vision_tower else ())
    for name, param in model.named_parameters():
        if any(part in name for part in fully_trained):
            param.requires_grad_(not ("mm_projector" in name and training_args.freeze_mm_mlp_adapter))
    if extra and os.path.isfile(extra):
        load_partial_state(model, load_file(extra))
    return model


def base_config(model):
    return model.get_base_model().config if is_peft_model(model) else model.config


def save_final(trainer: LLaVATrainer, training_args: TrainingArguments, tokenizer) -> None:
    """Stage 1: mm_projector.bin + config. LoRA: the adapter in lora_adapter/ and a merged full model.
    Otherwise the full model (safetensors), config with use_cache=True, and the tokenizer."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    base_config(model).use_cache = True
    output_dir = training_args.output_dir
    if not is_peft_model(model):
        trainer.save_model(output_dir)
        return
    trainer.save_model(os.path.join(output_dir, "lora_adapter"))
    with gathered(list(model.parameters())):
        if training_args.should_save:
            merged = model.merge_and_unload()
            merged.save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
            logger.info("Saved the LoRA-merged model to %s", output_dir)


def configure_reporting(training_args: TrainingArguments) -> None:
    """wandb only when asked for, and offline unless the user set up syncing."""
    if "wandb" in (training_args.report_to or []) and "WANDB_API_KEY" not in os.environ:
        os.environ.setdefault("WANDB_MODE", "offline")


def find_resume_checkpoint(training_args: TrainingArguments):
    """An explicit --resume_from_checkpoint wins; otherwise, like LLaVA, continue from the output dir's checkpoints."""
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if list(pathlib.Path(training_args.output_dir).glob("checkpoint-*")):
        logger.warning("resuming from the last checkpoint in %s", training_args.output_dir)
        return True
    return None


def train(argv=None) -> None:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else logging.WARNING,
    )
    llm_config = validate_args(model_args, data_args, training_args)
    configure_reporting(training_args)
    training_args.tune_mm_mlp_adapter = model_args.tune_mm_mlp_adapter
    if training_args.deepspeed:
        # DeepSpeed's own communication layer must be set up (on top of the process group accelerate may
        # already have made) before ZeRO-3 partitions weights inside from_pretrained.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if training_args.use_cpu else "nccl")

    compute_dtype = compute_dtype_of(training_args)
    tokenizer = build_tokenizer(model_args, training_args)
    transformers.set_seed(training_args.seed)  # the new modules' initial weights (projector, routers) follow --seed
    model = build_model(model_args, data_args, training_args, compute_dtype, llm_config)
    configure_trainable(model, model_args, training_args)
    if training_args.lora_enable:
        model = apply_lora(model, training_args, model_args.unfreeze_mm_vision_tower)
    data_module = make_supervised_data_module(tokenizer=tokenizer, data_args=data_args)

    trainer = LLaVATrainer(model=model, args=training_args, processing_class=tokenizer, **data_module)
    trainer.train(resume_from_checkpoint=find_resume_checkpoint(training_args))
    trainer.save_state()
    save_final(trainer, training_args, tokenizer)
    end_distributed(trainer)


if __name__ == "__main__":
    train()
