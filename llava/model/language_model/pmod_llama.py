"""p-MoD LLaVA on Llama (model_type ``pmod_llava_llama``), in the official checkpoint layout.

Layers chosen by the retention schedule are wrapped in :class:`pmod.layer.PmodDecoderLayer` (keys
``model.layers.{i}.decoder_layer.*`` and ``model.layers.{i}.router.router.*``). The model's forward routes
vision tokens at prefill/training; decode steps run every layer on the new tokens against that layer's own,
shorter KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast

from llava.model.language_model.llava_llama import (
    LlavaConfig,
    LlavaLlamaForCausalLM,
    LlavaLlamaModel,
    positions_from_mask,
)
from llava.model.llava_arch import MultimodalInputs
from pmod.cache import PmodCache
from pmod.layer import LayerRouting, PmodDecoderLayer
from pmod.routing import TokenCounts, TokenRouter, build_layer_plans, zero_linear
from pmod.schedule import RetentionSchedule, schedule_from_config
from pmod.weight_norm import parse_weight_norm

MOD_CONFIG_KEYS = (
    "mod_target_layers",
    "mod_target_token_type",
    "mod_router_factor",
    "mod_weight_norm",
    "mod_bias_enabled",
    "mod_special_init",
)


class PmodLlavaConfig(LlavaConfig):
    """LLaVA config plus the official ``mod_*`` keys; a bad p-MoD setting fails here, before any weight exists."""

    model_type = "pmod_llava_llama"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if getattr(self, "mod_target_layers", None) is not None:
            validate_mod_config(self)


def validate_mod_config(config) -> RetentionSchedule:
    """Parse schedule and weight norm of a p-MoD config; records the p-MoD layer indices in the config."""
    if getattr(config, "mod_target_token_type", None) is None:
        config.mod_target_token_type = "vision_all"
    parse_weight_norm(getattr(config, "mod_weight_norm", None))
    schedule = schedule_from_config(config)
    config.mod_target_layer_indices = list(schedule.mod_layers)
    return schedule


@dataclass(frozen=True)
class RoutingStats:
    """Host-side record of the last routed forward: vision tokens per sample and kept per p-MoD layer."""

    n_vision: tuple[int, ...]
    kept_vision: dict[int, tuple[int, ...]]


class PmodLlavaLlamaModel(LlavaLlamaModel):
    config_class = PmodLlavaConfig

    def __init__(self, config):
        super().__init__(config)
        self.schedule: RetentionSchedule | None = None
        self.last_routing_stats: RoutingStats | None = None
        if getattr(config, "mod_target_layers", None) is not None:
            self._wrap_mod_layers()

    def _init_weights(self, module):
        """Honour ``mod_special_init`` (zero routers) also for models built from a config."""
        super()._init_weights(module)
        if getattr(module, "pmod_zero_init", False):
            zero_linear(module)

    def initialize_mod_modules(self, model_args) -> None:
        """Training entry: copy the ``--mod_*`` flags into the config and wrap the scheduled layers."""
        if self.schedule is not None:
            raise RuntimeError("p-MoD layers are already built for this model")
        for key in MOD_CONFIG_KEYS:
            setattr(self.config, key, getattr(model_args, key))
        self._wrap_mod_layers()

    def _wrap_mod_layers(self) -> None:
        config = self.config
        self.schedule = validate_mod_config(config)
        weight_norm = parse_weight_norm(config.mod_weight_norm)
        for index in self.schedule.mod_layers:
            layer = self.layers[index]
            reference = layer.input_layernorm.weight
            router = TokenRouter(config.hidden_size, bool(config.mod_bias_enabled), bool(config.mod_special_init))
            router.to(device=reference.device, dtype=reference.dtype)
            self.layers[index] = PmodDecoderLayer(layer, router, weight_norm)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mod_target_mask: torch.Tensor | None = None,
        token_counts: TokenCounts | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = PmodCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                position_ids = positions_from_mask(attention_mask, length)
            else:
                position_ids = torch.arange(past_length, past_length + length, device=hidden.device)[None]

        routing = mod_target_mask is not None and self.schedule is not None
        if routing and (past_length > 0 or mod_target_mask.shape[1] != length):
            if mod_target_mask.shape[1] == length:
                raise NotImplementedError("p-MoD routes at prefill from an empty cache only (no chunked prefill)")
            routing = False  # a decode step of generate(): the prompt's mask is not for these tokens
        dense_layer = next((i for i, layer in enumerate(self.layers) if not isinstance(layer, PmodDecoderLayer)), None)
        dense_mask = None if dense_layer is None else create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
            past_key_values=past_key_values, position_ids=position_ids, layer_idx=dense_layer,
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)

        plans, compact_masks = {}, {}  # compact masks depend only on the compact length (prefill: empty caches)
        if routing:
            valid_mask = torch.ones_like(mod_target_mask) if attention_mask is None else attention_mask.bool()
            target_mask = mod_target_mask.bool() & valid_mask
            if token_counts is None or len(token_counts.n_target) != batch:
                token_counts = TokenCounts.from_masks(target_mask, valid_mask)
            plans = build_layer_plans(self.schedule, token_counts, hidden.device)
            self.last_routing_stats = RoutingStats(
                token_counts.n_target, {i: plan.keep_counts for i, plan in plans.items()}
            )

        for index, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            common = dict(position_embeddings=position_embeddings, past_key_values=past_key_values,
                          use_cache=use_cache, **kwargs)
            if index in plans:
                plan = plans[index]
                if plan.max_kept_length not in compact_masks:
                    compact_masks[plan.max_kept_length] = create_causal_mask(
                        config=self.config, inputs_embeds=hidden.new_empty(batch, plan.max_kept_length, 0),
                        attention_mask=None, past_key_values=past_key_values, position_ids=None, layer_idx=index,
                    )
                layer_routing = LayerRouting(plan, target_mask, valid_mask, compact_masks[plan.max_kept_length])
                hidden = layer(hidden, routing=layer_routing, position_ids=position_ids, **common)
                if isinstance(past_key_values, PmodCache):
                    past_key_values.record_compact_prefill(
                        index, plan.kept_lengths_tensor, plan.max_kept_length,
                        uniform=min(plan.kept_lengths) == plan.max_kept_length,
                    )
            elif isinstance(past_key_values, PmodCache) and past_key_values.is_compact(index):
                layer_mask = self._compact_cache_mask(past_key_values, index, hidden)
                hidden = layer(hidden, attention_mask=layer_mask, position_ids=position_ids, **common)
            else:
                hidden = layer(hidden, attention_mask=dense_mask, position_ids=position_ids, **common)
        if isinstance(past_key_values, PmodCache):
            past_key_values.seen_tokens = past_length + length
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), past_key_values=past_key_values)


    def _compact_cache_mask(self, cache: PmodCache, index: int, hidden: torch.Tensor):
        """Mask for new tokens attending to a compact layer's cache, whose rows may end at different slots."""
        padding = cache.key_padding_mask(index, hidden.shape[1])
        if padding is None and hidden.shape[1] == 1:
            return None  # one query per row and no filler slots: every back-end attends to the whole cache
        return create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=padding,
            past_key_values=cache, position_ids=None, layer_idx=index,
        )


class PmodLlavaLlamaForCausalLM(LlavaLlamaForCausalLM):
    config_class = PmodLlavaConfig
    language_model_class = PmodLlavaLlamaModel

    def forward(self, *args, mod_target_mask: torch.Tensor | None = None, token_counts: TokenCounts | None = None,
                **kwargs):
        """The LLaVA forward; ``mod_target_mask`` marks the tokens to route (set by input preparation)."""
        if mod_target_mask is not None:
            kwargs.update(mod_target_mask=mod_target_mask, token_counts=token_counts)
        return super().forward(*args, **kwargs)

    def routing_inputs(self, prepared: MultimodalInputs) -> dict:
        return {"mod_target_mask": prepared.target_mask, "token_counts": prepared.counts}

    def generation_inputs(self, prepared: MultimodalInputs) -> dict:
        inputs = super().generation_inputs(prepared)
        inputs.update(self.routing_inputs(prepared), past_key_values=PmodCache(config=self.config))
        return inputs


AutoConfig.register("pmod_llava_llama", PmodLlavaConfig)
AutoModelForCausalLM.register(PmodLlavaConfig, PmodLlavaLlamaForCausalLM)
