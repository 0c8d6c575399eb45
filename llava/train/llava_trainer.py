"""LLaVA's Trainer: modality-grouped batches, per-module learning rates, projector-only and LoRA checkpoints.

Only public or long-stable Trainer hooks are overridden (``_get_train_sampler(train_dataset)``,
``create_optimizer``, ``save_model``, ``_save``, ``_load_from_checkpoint``), so that checkpoints written here
resume with the stock Trainer machinery (optimizer, scheduler, RNG and data position included).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from llava.train.sampler import LengthGroupedSampler

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "mm_projector.bin"
NON_LORA_FILE = "non_lora_trainables.safetensors"
PROJECTOR_KEY = "mm_projector"
VISION_TOWER_KEY = "vision_tower"


def gathered(params, modify: bool = False):
    """Context in which ZeRO-3 partitioned parameters hold their full values (a no-op otherwise).

    With ``modify``, rank 0's in-place changes are written back to every rank's shard on exit.
    """
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None)


def end_distributed(trainer: Trainer) -> None:
    """Every rank waits for the checkpoint writers, then the process group closes.

    A rank that exits with its gloo/NCCL group still open can abort in C++ teardown ("terminate called
    without an active exception") while another rank is still writing, which fails the whole launch.
    """
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gather_named_tensors(named_params) -> dict[str, torch.Tensor]:
    """Full CPU copies of the given parameters, gathering ZeRO-3 shards; every rank must call this."""
    named_params = list(named_params)
    with gathered([p for _, p in named_params]):
        return {name: p.detach().cpu().clone() for name, p in named_params}


def build_param_groups(model: torch.nn.Module, decay_names, weight_decay: float, module_lrs: dict[str, float]):
    """Optimizer groups: decay / no-decay, and for each ``{name substring: lr}`` its own pair of groups.

    A parameter belongs to the first substring it contains (so ``mm_projector`` and ``vision_tower`` parameters
    get their own learning rates); the rest uses the optimizer's default learning rate.
    """
    decay_names = set(decay_names)
    buckets: dict[tuple[str | None, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = next((k for k in module_lrs if k in name), None)
        buckets.setdefault((key, name in decay_names), []).append(param)
    groups = []
    for (key, decays), params in buckets.items():
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if key is not None:
            group["lr"] = module_lrs[key]
        groups.append(group)
    return groups


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


class LLaVATrainer(Trainer):
    """The HF Trainer with LLaVA's sampler, learning-rate groups and stage-aware saving."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None or not getattr(self.args, "group_by_modality_length", False):
            return super()._get_train_sampler(train_dataset)
        # A seeded generator makes the order independent of RNG use elsewhere, so a resumed run sees the same order.
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(
            self.args.train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            lengths=dataset.modality_lengths,
            generator=torch.Generator().manual_seed(seed),
            group_by_modality=True,
        )

    def create_optimizer(self, model=None):
        module_lrs = {
            key: lr
            for key, lr in ((PROJECTOR_KEY, self.args.mm_projector_lr), (VISION_TOWER_KEY, self.args.mm_vision_tower_lr))
            if lr is not None
        }
        if self.optimizer is not None or not module_lrs:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = build_param_groups(
            opt_model, self.get_decay_parameter_names(opt_model), self.args.weight_decay, module_lrs
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    @property
    def projector_only(self) -> bool:
        """Stage 1 (``--tune_mm_mlp_adapter``): checkpoints and the final save hold only the projector."""
        return bool(getattr(self.args, "tune_mm_mlp_adapter", False))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.projector_only:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        weights = gather_named_tensors((n, p) for n, p in model.named_parameters() if PROJECTOR_KEY in n)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            model.config.save_pretrained(output_dir)
            torch.save(weights, os.path.join(output_dir, PROJECTOR_FILE))
            logger.info("Saved %d projector tensors to %s", len(weights), output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """LoRA saves are LLaVA-style folders: adapter, non-LoRA trainables and the model config."""
        super()._save(output_dir, state_dict)
        if not (is_peft_model(self.model) and self.args.should_save):
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_file(non_lora_trainables(self.model, state_dict), os.path.join(output_dir, NON_LORA_FILE))
        self.accelerator.unwrap_model(self.model).get_base_model().config.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        projector_file = os.path.join(resume_from_checkpoint, PROJECTOR_FILE)
        if self.projector_only and os.path.isfile(projector_file):
            load_partial_state(model, torch.load(projector_file, map_location="cpu", weights_only=True))
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        non_lora_file = os.path.join(resume_from_checkpoint, NON_LORA_FILE)
        if is_peft_model(self.model) and os.path.isfile(non_lora_file):
            load_partial_state(self.model, load_file(non_lora_file))


def non_lora_trainables(model, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Trainable weights that a LoRA adapter file does not hold: projector, p-MoD routers, image_newline."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    if state_dict is not None:
        return {n: state_dict[n].detach().cpu().contiguous() for n, _ in named if n in state_dict}
    return gather_named_tensors(named)


def load_partial_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into the matching parameters; a name the model lacks is an error, not a silent skip."""
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise KeyError(f"checkpoint tensors not found in the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with gathered([params[n] for n in tensors], modify=True), torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].dtype))
