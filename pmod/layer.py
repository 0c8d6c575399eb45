"""A p-MoD decoder layer: a stock transformers decoder layer plus a router, run on each sample's kept tokens.

The wrapped layer's own sub-modules (input_layernorm, self_attn, post_attention_layernorm, mlp) are called on
the compact sequence of kept tokens, so attention back-ends, caches and kernels stay transformers' own.
Per-token update (the official math, "STRing" reweighting with w = norm(router logit)):

    kept vision token      y = x + Attn(x) + w * MLP(x + Attn(x))
    kept text token        y = x + Attn(x) + MLP(x + Attn(x))
    skipped vision token   y = w * x
    padding                y = x

The kept tokens run as a right-padded ``[B, Lk_max, D]`` batch when every sample keeps as many tokens (no
padding to save); otherwise as one packed ``[1, sum Lk, D]`` row, so projections, MLP and attention pay only for
real tokens, and the result is written back in one ``index_copy``. A cache stores either in its compact
``[B, Lk_max]`` layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from pmod.hf_compat import CACHE_ARG
from pmod.packing import PACKING_KWARG, TokenRows, packed_attention_for
from pmod.routing import LayerPlan, Selection, TokenRouter, gather_tokens, select_tokens
from pmod.weight_norm import WeightNorm


def finite_checks_enabled() -> bool:
    """Opt-in debug check (``PMOD_CHECK_FINITE=1``): it synchronises with the host, so it is off by default."""
    return os.environ.get("PMOD_CHECK_FINITE", "0") == "1"


@dataclass(frozen=True)
class LayerRouting:
    """Inputs a p-MoD layer needs to route one batch (built by the model once per layer)."""

    plan: LayerPlan
    target_mask: torch.Tensor  # [B, L] bool
    valid_mask: torch.Tensor  # [B, L] bool
    compact_attention_mask: torch.Tensor | None  # mask for the compact sequence, in the back-end's format
    selection: Selection | None = None  # chosen by a training-free reducer (p-MoD layers choose their own)
    rows: TokenRows | None = None  # set when the kept tokens run packed (the plan then has ``packed``)


class PmodDecoderLayer(GradientCheckpointingLayer):
    """Routes vision tokens around a wrapped decoder layer; without routing it is the wrapped layer."""

    def __init__(self, decoder_layer: nn.Module, router: TokenRouter, weight_norm: WeightNorm):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.router = router
        self.weight_norm = weight_norm

    def forward(
        self,
        hidden_states: torch.Tensor,
        routing: LayerRouting | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """``kwargs`` carry the cache under the installed transformers' name for it (``pmod.hf_compat``)."""
        if routing is None:
            return self.decoder_layer(
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **kwargs,
            )
        return routed_forward(self.decoder_layer, self.router, self.weight_norm, hidden_states, routing,
                              position_embeddings, use_cache, **kwargs)


def routed_forward(layer: nn.Module, router: TokenRouter | None, weight_norm: WeightNorm | None,
                   hidden_states: torch.Tensor, routing: LayerRouting, position_embeddings, use_cache: bool,
                   **kwargs) -> torch.Tensor:
    """One decoder layer on each sample's kept tokens; ``layer`` is any Llama-family decoder layer (its
    ``input_layernorm``, ``self_attn``, ``post_attention_layernorm`` and ``mlp`` are called).

    With a router: p-MoD, the layer picks its tokens and reweights them (STRing). Without (``router`` None): a
    training-free reducer, which takes ``routing.selection`` as chosen for it and leaves every weight at 1.
    """
    if routing.rows is not None:
        output = _packed_forward(layer, router, weight_norm, hidden_states, routing, position_embeddings, use_cache,
                                 **kwargs)
    else:
        output = _padded_forward(layer, router, weight_norm, hidden_states, routing, position_embeddings, use_cache,
                                 **kwargs)
    if finite_checks_enabled() and not torch.isfinite(output).all():
        raise FloatingPointError(
            f"p-MoD layer {layer.self_attn.layer_idx} produced NaN/Inf (dtype {hidden_states.dtype}); "
            "try float32 or bfloat16"
        )
    return output


def _padded_forward(layer, router, weight_norm, hidden_states, routing: LayerRouting, position_embeddings,
                    use_cache: bool, **kwargs) -> torch.Tensor:
    if router is None:
        selection, mlp_scale = routing.selection, None
    else:
        logits = router(hidden_states)
        weights = weight_norm(logits, routing.target_mask)
        selection = select_tokens(logits, routing.target_mask, routing.valid_mask, routing.plan)
        mlp_scale = torch.where(routing.target_mask, weights, weights.new_ones(())).to(hidden_states.dtype)

    compact = gather_tokens(hidden_states, selection.compact_index)
    cos, sin = position_embeddings
    compact_rope = (gather_tokens(cos, selection.compact_index), gather_tokens(sin, selection.compact_index))
    attn_out, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(compact),
        attention_mask=routing.compact_attention_mask,
        position_embeddings=compact_rope,
        use_cache=use_cache,
        **kwargs,
    )
    residual = compact + attn_out
    mlp_out = layer.mlp(layer.post_attention_layernorm(residual))
    if mlp_scale is None:
        compact_out, skipped = residual + mlp_out, hidden_states
    else:
        compact_out = residual + mlp_out * gather_tokens(mlp_scale, selection.compact_index).unsqueeze(-1)
        skipped = hidden_states * mlp_scale.unsqueeze(-1)

    processed = gather_tokens(compact_out, selection.full_to_compact)
    return torch.where(selection.kept.unsqueeze(-1), processed, skipped)


def _packed_forward(layer, router, weight_norm, hidden_states, routing: LayerRouting, position_embeddings,
                    use_cache: bool, **kwargs) -> torch.Tensor:
    """The kept tokens of every sample as one packed row; selection still ranks within each sample's row. A
    cache stores the row in its compact layout (``PmodCache.expect_packed_prefill``)."""
    rows, plan = routing.rows, routing.plan
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    if router is None:
        selection, scale = routing.selection, None
    else:
        logits = rows.to_rows(router(flat))
        weights = weight_norm(logits, routing.target_mask)
        selection = select_tokens(logits, routing.target_mask, routing.valid_mask, plan)
        scale = rows.to_flat(torch.where(routing.target_mask, weights, weights.new_ones(()))).to(flat.dtype)
    kept = (selection.compact_index + rows.row_offsets[:, None]).reshape(-1)[plan.packed.slots]
    compact = flat[kept][None]
    batch, length = hidden_states.shape[:2]
    rope = tuple(_gather_flat(t, kept, length) for t in position_embeddings)
    kwargs[PACKING_KWARG] = plan.packed.sequences
    cache = kwargs.get(CACHE_ARG)
    if use_cache and cache is not None:
        cache.expect_packed_prefill(layer.self_attn.layer_idx, plan.packed.slots, batch, plan.max_kept_length)
    with packed_attention_for(layer.self_attn.config):
        attn_out, _ = layer.self_attn(hidden_states=layer.input_layernorm(compact), attention_mask=None,
                                      position_embeddings=rope, use_cache=use_cache, **kwargs)
    residual = compact + attn_out
    mlp_out = layer.mlp(layer.post_attention_layernorm(residual))
    if scale is None:
        return flat.index_copy(0, kept, (residual + mlp_out)[0]).view_as(hidden_states)
    processed = residual + mlp_out * scale[kept].unsqueeze(-1)
    return (flat * scale.unsqueeze(-1)).index_copy(0, kept, processed[0]).view_as(hidden_states)


def _gather_flat(values: torch.Tensor, flat_index: torch.Tensor, length: int) -> torch.Tensor:
    """[1, N, d] rows of a [B or 1, L, d] tensor at flat token indices b * L + position; a batch of 1 shared by
    every row is read by position, without expanding it to B copies."""
    if values.shape[0] == 1:
        return values[0][flat_index % length][None]
    return values.reshape(-1, values.shape[-1])[flat_index][None]
