"""Dense LLaVA on Llama (model_type ``llava_llama``): the stock transformers Llama plus LLaVA's glue."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

from llava.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel, MultimodalInputs
from pmod.hf_compat import cache_kwargs, one_cache, pop_cache
from pmod.packing import PACKING_KWARG, check_packed_attention, enable_packed_attention


class LlavaConfig(LlamaConfig):
    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    config_class = LlavaConfig


def positions_from_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Position ids of the last `query_length` tokens: count of real tokens before each (left padding safe)."""
    positions = attention_mask.long().cumsum(dim=-1) - 1
    return positions.clamp(min=0)[:, -query_length:]


def padded_decode_mask(attention_mask: torch.Tensor | None, query_length: int, capacity: int) -> torch.Tensor | None:
    """A single-token decode step's ``[B, past + 1]`` padding mask, right-padded with zeros to ``[B, capacity]``
    (a fixed-size cache's length): every compiled step then sees the same shapes, and the new token's position
    (the count of real tokens) is unchanged by the zeros. Other steps' masks are returned as they are."""
    if attention_mask is None or attention_mask.ndim != 2 or query_length != 1 or attention_mask.shape[1] == 1:
        return attention_mask
    if attention_mask.shape[1] > capacity:
        raise ValueError(f"the static cache holds {capacity} tokens (max_cache_len); this step needs "
                         f"{attention_mask.shape[1]}: build it with a larger max_cache_len")
    return torch.nn.functional.pad(attention_mask, (0, capacity - attention_mask.shape[1]))


def build_causal_lm(head: LlamaForCausalLM, config, model_class) -> None:
    """LlamaForCausalLM's construction with our model class, without first building a stock LlamaModel."""
    LlamaPreTrainedModel.__init__(head, config)
    head.model = model_class(config)
    head.vocab_size = config.vocab_size
    head.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    head.post_init()


class LlavaForCausalLMMixin(LlavaMetaForCausalLM):
    """forward/generate that accept ``images`` and ``image_sizes`` next to ``input_ids`` (LLaVA's interface)."""

    pack_sequences = False  # set by enable_sequence_packing: batches with labels run as one packed row

    def enable_sequence_packing(self) -> None:
        """Padding-free training (``--packing``): a batch with labels runs as one row of its samples, after image
        expansion; attention keeps the samples apart (``pmod.packing``)."""
        enable_packed_attention(self.config)
        self.pack_sequences = True

    def routing_inputs(self, prepared: MultimodalInputs) -> dict:
        """Extra forward kwargs derived from prepared inputs; p-MoD passes its routing targets here."""
        return {}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images=None,
        image_sizes=None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs,
    ):
        """LlamaForCausalLM's forward plus ``images``/``image_sizes``; the cache may come as ``cache`` or
        ``past_key_values`` and is passed on under the name the installed transformers uses."""
        if inputs_embeds is None and images is not None:
            pack = self.pack_sequences and labels is not None
            prepared = self.prepare_multimodal_inputs(input_ids, attention_mask, labels, images, image_sizes,
                                                      pack=pack)
            input_ids, inputs_embeds = None, prepared.inputs_embeds
            attention_mask, position_ids, labels = prepared.attention_mask, prepared.position_ids, prepared.labels
            kwargs.update(self.routing_inputs(prepared))
            if prepared.packing is not None:
                check_packed_attention(self.config)
                kwargs[PACKING_KWARG] = prepared.packing
                use_cache = False
        if position_ids is None and attention_mask is not None and attention_mask.ndim == 2:
            length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = positions_from_mask(attention_mask, length)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **cache_kwargs(one_cache(cache, past_key_values)),
            **kwargs,
        )

    def create_masks_for_generate(self, attention_mask=None, inputs_embeds=None, **kwargs):
        """With a fixed-size cache (``cache_implementation="static"``) transformers would build one 4D mask here for
        every layer; our forward needs the 2D padding mask (left-padded rows' positions, p-MoD's compact-layer
        masks), padded to the cache's capacity at decode steps (``padded_decode_mask``)."""
        cache = pop_cache(kwargs)
        return padded_decode_mask(attention_mask, inputs_embeds.shape[1], cache.get_max_length())

    def generation_inputs(self, prepared: MultimodalInputs, cache=None, generation: dict | None = None) -> dict:
        """Model kwargs for ``generate`` from prepared multimodal inputs; ``cache``: one to continue, or None;
        ``generation``: the caller's generate kwargs (a subclass may take what sizes its cache from them)."""
        return {"inputs_embeds": prepared.inputs_embeds, "attention_mask": prepared.attention_mask,
                **cache_kwargs(cache)}

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images=None, image_sizes=None, **kwargs):
        """Generate from ``input_ids`` with image tokens; returns only the new tokens when images are given.

        Prompts of a batch are left-padded after image expansion, so batched generation is correct whatever
        padding the caller used. A cache returned by an earlier call (``cache`` or ``past_key_values``) continues
        it: pass the whole conversation again (same images); only the tokens after the cached ones are computed.
        """
        if "inputs_embeds" in kwargs:
            raise NotImplementedError("pass input_ids with image tokens and images=..., not inputs_embeds")
        attention_mask = kwargs.pop("attention_mask", None)
        kwargs.pop("position_ids", None)
        cache = pop_cache(kwargs)
        if images is None:
            return super().generate(inputs, attention_mask=attention_mask, **cache_kwargs(cache), **kwargs)
        if kwargs.get("use_cache") is False:
            raise ValueError("generate(images=..., use_cache=False) is not supported: transformers feeds the prompt "
                             "embeddings only at the first step, so later steps would lose the image; use the cache")
        prepared = self.prepare_multimodal_inputs(inputs, attention_mask, None, images, image_sizes, padding_side="left")
        return super().generate(**self.generation_inputs(prepared, cache, kwargs), **kwargs)


class LlavaLlamaForCausalLM(LlavaForCausalLMMixin, LlamaForCausalLM):
    config_class = LlavaConfig
    language_model_class = LlavaLlamaModel

    def __init__(self, config):
        build_causal_lm(self, config, self.language_model_class)

    def get_model(self):
        return self.model


AutoConfig.register("llava_llama", LlavaConfig)
AutoModelForCausalLM.register(LlavaConfig, LlavaLlamaForCausalLM)
