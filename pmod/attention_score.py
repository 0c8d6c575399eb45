"""The attention one query row pays to every key, computed apart from the layer's attention kernel.

FastV and PyramidDrop rank vision tokens by the attention weights of the last prompt token. Their official
code reads those weights from eager attention, which makes every layer eager. Here the one row is computed
separately from the layer's own layernorm, projections and RoPE, so the layers keep SDPA / flash attention.
The extra work is one key projection over the sequence and one query row (``pmod.accounting`` counts it).
"""

from __future__ import annotations

import torch
from torch import nn

from pmod.routing import gather_tokens


def rotate_half(states: torch.Tensor) -> torch.Tensor:
    first, second = states.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def last_valid_index(valid_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last real token (the last prompt token, left or right padding), on the device."""
    positions = torch.arange(valid_mask.shape[1], device=valid_mask.device)
    return (valid_mask.long() * (positions + 1)).argmax(dim=1)


def query_row_attention(layer: nn.Module, hidden_states: torch.Tensor, position_embeddings, keys_alive: torch.Tensor,
                        query_index: torch.Tensor) -> torch.Tensor:
    """[B, L] softmax attention of token ``query_index[b]`` over the alive keys, averaged over heads (float32).

    ``layer`` is a Llama-family decoder layer (``input_layernorm``, ``self_attn.q_proj/k_proj``, ``head_dim``,
    ``scaling``); keys that are not alive (padding, dropped tokens, tokens after the query) weigh 0.
    """
    attention = layer.self_attn
    batch, length, _ = hidden_states.shape
    head_dim = attention.head_dim
    normed = layer.input_layernorm(hidden_states)
    cos, sin = position_embeddings
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)

    keys = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
    query_index = query_index[:, None]
    query = attention.q_proj(gather_tokens(normed, query_index)).view(batch, 1, -1, head_dim).transpose(1, 2)
    query_cos, query_sin = gather_tokens(cos, query_index)[:, None], gather_tokens(sin, query_index)[:, None]
    query = query * query_cos + rotate_half(query) * query_sin
    kv_heads = keys.shape[1]
    grouped = query.view(batch, kv_heads, -1, head_dim)  # query head h uses key head h // (H / H_kv)
    logits = (grouped @ keys.transpose(-1, -2)).view(batch, -1, length).float() * attention.scaling  # [B, H, L]
    after_query = torch.arange(length, device=keys_alive.device)[None] > query_index
    hidden = ~keys_alive | after_query
    return logits.masked_fill(hidden[:, None], float("-inf")).softmax(dim=-1).mean(dim=1)
