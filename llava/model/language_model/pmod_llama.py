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
from pmod.layer import PmodDecoderLayer, routed_forward
from pmod.packing import PACKING_KWARG, TokenRows, check_packed_attention
from pmod.reducers import ReducerSpec
from pmod.routing import TokenCounts, TokenRouter, zero_linear
from pmod.schedule import RetentionSchedule
from pmod.session import ForwardSession, check_mask_width, packed_routing_inputs, routing_inputs
from pmod.settings import MOD_CONFIG_KEYS, validate_mod_config
from pmod.static_cache import new_generation_cache
from pmod.weight_norm import parse_weight_norm


class PmodLlavaConfig(LlavaConfig):
    """LLaVA config plus the official ``mod_*`` keys; a bad p-MoD setting fails here, before any weight exists."""

    model_type = "pmod_llava_llama"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if getattr(self, "mod_target_layers", None) is not None:
            validate_mod_config(self)


@dataclass(frozen=True)
class RoutingStats:
    """Host-side record of the last routed forward: vision tokens per sample and kept per p-MoD layer."""

    n_vision: tuple[int, ...]
    kept_vision: dict[int, tuple[int, ...]]


class PmodLlavaLlamaModel(LlavaLlamaModel):
    config_class = PmodLlavaConfig
    pack_kept_tokens = True  # False: uneven samples keep the padded compact layout (benchmarks compare both)

    def __init__(self, config):
        super().__init__(config)
        self.schedule: RetentionSchedule | None = None
        self.reducer: ReducerSpec | None = None  # set by llava.model.reduce.apply_reducer on a dense model
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

        The cache may come as ``cache`` (transformers >= 5.24) or ``past_key_values``. A packed input (one row of
        several samples, ``pmod_packing`` = their :class:`pmod.packing.PackedSequences`) runs without a cache.
        """
        cache = one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        length = hidden.shape[1]
        packing = kwargs.get(PACKING_KWARG)
        use_cache = (self.config.use_cache if use_cache is None else use_cache) and packing is None
        if use_cache and cache is None:
            cache = PmodCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        check_mask_width(attention_mask, cache, past_length, length)

        routing = input_rows = None
        if packing is not None:
            if cache is not None or self.reducer is not None:
                raise ValueError("a packed input runs without a cache and without a training-free reducer")
            check_packed_attention(self.config)
            input_rows = TokenRows.packed(packing, hidden.device)
            if position_ids is None:
                position_ids = packing.position_ids(hidden.device)
        if position_ids is None:
            if attention_mask is not None and attention_mask.ndim == 2:
                position_ids = positions_from_mask(attention_mask, length)
            else:
                position_ids = torch.arange(past_length, past_length + length, device=hidden.device)[None]
        if mod_target_mask is not None and self.schedule is not None:
            if input_rows is not None:
                routing = packed_routing_inputs(mod_target_mask, input_rows, token_counts)
            else:
                routing = routing_inputs(cache, past_length, length, mod_target_mask, attention_mask, token_counts)
        session = ForwardSession(self.config, self.schedule, cache, attention_mask, hidden, past_length, routing,
                                 self.reducer, input_rows, self.pack_kept_tokens)
        if session.plans:
            self.last_routing_stats = RoutingStats(
                routing.counts.n_target, {i: plan.keep_counts for i, plan in session.plans.items()}
            )
        routed_layers = set(self.schedule.mod_layers) if self.schedule is not None else set()
        dense_layer = next((i for i in range(self.config.num_hidden_layers) if i not in routed_layers), None)
        dense_mask = None if dense_layer is None or packing is not None else create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
            layer_idx=dense_layer, **cache_kwargs(cache),
        )
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)

        common = dict(position_embeddings=position_embeddings, position_ids=position_ids, use_cache=use_cache,
                      **cache_kwargs(cache), **kwargs)
        for index, layer in enumerate(self.layers[: self.config.num_hidden_layers]):
            session.before_layer(index, layer, hidden, position_embeddings)
            layer_routing = session.layer_routing(index)
            if layer_routing is not None:
                if isinstance(layer, PmodDecoderLayer):
                    hidden = layer(hidden, routing=layer_routing, **common)
                else:  # a training-free reducer's layer: the session chose its tokens
                    hidden = routed_forward(layer, None, None, hidden, layer_routing, position_embeddings, use_cache,
                                            **cache_kwargs(cache), **kwargs)
                session.routed(index)
            elif session.is_compact(index):
                hidden = layer(hidden, attention_mask=session.compact_mask(index), **common)
            else:
                hidden = layer(hidden, attention_mask=dense_mask, **common)
        session.finish()
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), **cache_kwargs(cache))


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

    def generation_inputs(self, prepared: MultimodalInputs, cache=None, generation: dict | None = None) -> dict:
        """A fresh PmodCache unless the caller continues one (e.g. a second chat turn); with
        ``cache_implementation="static"`` a :class:`PmodStaticCache` sized for the prompt and ``max_new_tokens``
        (the option is taken out of ``generation``: transformers would build a cache without p-MoD layers)."""
        if cache is None:
            cache = new_generation_cache(self.config, self.generation_config, prepared.inputs_embeds.shape[1],
                                         generation if generation is not None else {})
        inputs = super().generation_inputs(prepared, cache, generation)
        inputs.update(self.routing_inputs(prepared))
        return inputs


AutoConfig.register("pmod_llava_llama", PmodLlavaConfig)
AutoModelForCausalLM.register(PmodLlavaConfig, PmodLlavaLlamaForCausalLM)
