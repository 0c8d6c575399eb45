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
from pmod.hf_compat import cache_kwargs, one_cache
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
        cache=None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """LlamaModel's forward; ``mod_target_mask`` (with an empty cache) routes the marked tokens.

        The cache may come as ``cache`` (transformers >= 5.24) or ``past_key_values``.
        """
        cache = one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = hidden.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = PmodCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        _check_mask_width(attention_mask, cache, past_length, length)
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                position_ids = positions_from_mask(attention_mask, length)
            else:
                position_ids = torch.arange(past_length, past_length + length, device=hidden.device)[None]

        plans = {}
        if mod_target_mask is not None and self.schedule is not None:
            routed = self._routing_inputs(cache, past_length, length, mod_target_mask, attention_mask, token_counts)
            if routed is not None:
                target_mask, valid_mask, token_counts = routed
                plans = build_layer_plans(self.schedule, token_counts, hidden.device)
                self.last_routing_stats = RoutingStats(
                    token_counts.n_target, {i: plan.keep_counts for i, plan in plans.items()}
                )
        dense_layer = next((i for i, layer in enumerate(self.layers) if not isinstance(layer, PmodDecoderLayer)), None)
        dense_mask = None if dense_layer is None else create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
            layer_idx=dense_layer, **cache_kwargs(cache),
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)

        # Masks are shared: at prefill by compact length (empty caches), at later steps by kept-length pattern.
        prefill_masks, cached_masks = {}, {}
        common = dict(position_embeddings=position_embeddings, position_ids=position_ids, use_cache=use_cache,
                      **cache_kwargs(cache), **kwargs)
        for index, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            compact = cache.compact_layer(index) if isinstance(cache, PmodCache) else None
            if index in plans:
                plan = plans[index]
                if plan.max_kept_length not in prefill_masks:
                    prefill_masks[plan.max_kept_length] = create_causal_mask(
                        config=self.config, inputs_embeds=hidden.new_empty(batch, plan.max_kept_length, 0),
                        attention_mask=None, position_ids=None, layer_idx=index, **cache_kwargs(cache),
                    )
                layer_routing = LayerRouting(plan, target_mask, valid_mask, prefill_masks[plan.max_kept_length])
                hidden = layer(hidden, routing=layer_routing, **common)
                if cache is not None:
                    cache.record_routed_prefill(index, plan.kept_lengths_tensor, plan.kept_lengths)
            elif compact is not None:
                if compact.pattern not in cached_masks:
                    cached_masks[compact.pattern] = self._compact_cache_mask(cache, index, hidden, attention_mask)
                hidden = layer(hidden, attention_mask=cached_masks[compact.pattern], **common)
            else:
                hidden = layer(hidden, attention_mask=dense_mask, **common)
        if isinstance(cache, PmodCache):
            if plans:
                cache.prefill_vision = token_counts.n_target
            elif cached_masks and length > 1 and attention_mask is not None:
                cache.added_tokens_may_pad = True
            cache.seen_tokens = past_length + length
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), **cache_kwargs(cache))

    def _routing_inputs(self, cache, past_length, length, mod_target_mask, attention_mask, token_counts):
        """(target mask, valid mask, counts) when this forward routes, None when the cache already holds the routing.

        Routing happens at prefill, from an empty cache. With a filled cache the routing inputs belong to the
        prompt: a decode step of ``generate()``, or a longer prompt that continues the cached one, whose new
        tokens must then be text.
        """
        width = mod_target_mask.shape[1]
        if past_length > 0:
            if width == length:
                raise NotImplementedError("p-MoD routes at prefill from an empty cache only (no chunked prefill)")
            if width == past_length + length and getattr(cache, "prefill_vision", None) is not None:
                counts = token_counts
                if counts is None or len(counts.n_target) != mod_target_mask.shape[0]:
                    valid = None if attention_mask is None else attention_mask.bool()
                    counts = TokenCounts.from_masks(mod_target_mask.bool(), valid)
                if counts.n_target != cache.prefill_vision:
                    raise NotImplementedError(
                        "p-MoD routes vision tokens at prefill only: tokens that continue a filled cache must be "
                        "text. Start a new prompt (without the cache) to add an image."
                    )
            return None
        if cache is not None and not isinstance(cache, PmodCache):
            raise TypeError(
                f"a routed p-MoD prefill needs a PmodCache(config=model.config), got {type(cache).__name__}"
            )
        if width != length:
            raise ValueError(f"mod_target_mask covers {width} tokens but the input has {length}")
        valid_mask = torch.ones_like(mod_target_mask, dtype=torch.bool) if attention_mask is None \
            else attention_mask.bool()
        target_mask = mod_target_mask.bool() & valid_mask
        if token_counts is None or len(token_counts.n_target) != target_mask.shape[0]:
            token_counts = TokenCounts.from_masks(target_mask, valid_mask)
        return target_mask, valid_mask, token_counts

    def _compact_cache_mask(self, cache: PmodCache, index: int, hidden: torch.Tensor, attention_mask):
        """Mask of the new tokens against a compact layer's keys, built on the device without a host read.

        The layer's query offset is its own key length (``PmodCache.get_query_offset``), and skipping the mask
        for SDPA's ``is_causal`` is not allowed, since deciding that would read the padding mask on the host.
        """
        valid = cache.key_valid(index, attention_mask, hidden.shape[1])
        if valid is None and hidden.shape[1] == 1:
            return None  # one query per row and no filler slots: every back-end attends to the whole cache
        return create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=valid, position_ids=None, layer_idx=index,
            allow_is_causal_skip=False, **cache_kwargs(cache),
        )


def _check_mask_width(attention_mask, cache, past_length: int, length: int) -> None:
    """Compact layers read the tokens added after prefill from the end of a full-sequence attention mask."""
    if attention_mask is None or attention_mask.ndim != 2 or not isinstance(cache, PmodCache) or past_length == 0:
        return
    if attention_mask.shape[1] != past_length + length:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} tokens; with a filled p-MoD cache it must cover the "
            f"{past_length} cached tokens and the {length} new ones"
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

    def generation_inputs(self, prepared: MultimodalInputs, cache=None) -> dict:
        """A fresh PmodCache unless the caller continues one (e.g. a second chat turn)."""
        inputs = super().generation_inputs(prepared, cache if cache is not None else PmodCache(config=self.config))
        inputs.update(self.routing_inputs(prepared))
        return inputs


AutoConfig.register("pmod_llava_llama", PmodLlavaConfig)
AutoModelForCausalLM.register(PmodLlavaConfig, PmodLlavaLlamaForCausalLM)
