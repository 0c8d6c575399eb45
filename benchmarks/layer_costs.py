"""One p-MoD layer in isolation: does its cost scale with the kept tokens, and what does routing itself cost?

For a range of keep ratios the routed layer is timed against the same decoder layer run densely on every
token, and the routing work alone (router, weight norm, top-k selection, the gathers in and out and the
STRing update) is timed on the same tensors, so ``layer - routing`` is what the kept tokens cost.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from benchmarks.models import ModelPair, llm_inputs
from benchmarks.timing import measure
from pmod.accounting import ModelShape, attention_flops, linear_flops
from pmod.layer import LayerRouting
from pmod.routing import LayerPlan, gather_tokens, select_tokens

KEEP_RATIOS = (1.0, 0.75, 0.5, 0.25, 0.15)


@dataclass(frozen=True)
class LayerCostRow:
    keep_ratio: float
    kept_tokens: int
    dense_ms: float
    routed_ms: float
    routing_ms: float
    predicted_ratio: float  # FLOPs of the kept tokens / FLOPs of all tokens (pmod.accounting)

    @property
    def ratio(self) -> float:
        return self.routed_ms / self.dense_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def uniform_plan(batch: int, n_text: int, keep: int, device: torch.device) -> LayerPlan:
    """Every sample keeps ``keep`` of its vision tokens and all ``n_text`` text tokens."""
    lengths = (n_text + keep,) * batch
    return LayerPlan(torch.full((batch,), keep, device=device), (keep,) * batch, lengths, n_text + keep,
                     torch.tensor(lengths, device=device))


def layer_costs(pair: ModelPair, warmup: int, repeats: int, batch: int = 1,
                ratios: tuple[float, ...] = KEEP_RATIOS) -> list[LayerCostRow]:
    llm = pair.pmod.get_model()
    layer = llm.layers[llm.schedule.mod_layers[0]]
    inputs = llm_inputs(pair, batch)
    hidden, targets = inputs.inputs_embeds, inputs.target_mask
    valid = torch.ones_like(targets)
    positions = torch.arange(hidden.shape[1], device=pair.device)[None]
    rope = llm.rotary_emb(hidden, position_ids=positions)
    preset = pair.preset
    shape = ModelShape.from_config(pair.pmod.config)

    def flops(tokens):
        return linear_flops(shape, tokens) + attention_flops(shape, tokens)

    with torch.no_grad():
        dense_ms = measure(lambda: layer.decoder_layer(hidden, position_embeddings=rope), pair.device, warmup,
                           repeats).median_s * 1e3
        rows = []
        for ratio in ratios:
            keep = int(preset.n_vision * ratio)
            plan = uniform_plan(batch, preset.n_text, keep, pair.device)
            routing = LayerRouting(plan, targets, valid, None)

            def routed_layer(routing=routing):
                return layer(hidden, routing=routing, position_embeddings=rope)

            def routing_alone(routing=routing):
                return _routing_only(layer, hidden, routing, rope)

            routed = measure(routed_layer, pair.device, warmup, repeats).median_s * 1e3
            overhead = measure(routing_alone, pair.device, warmup, repeats).median_s * 1e3
            kept = preset.n_text + keep
            rows.append(LayerCostRow(ratio, kept, dense_ms, routed, overhead, flops(kept) / flops(preset.n_tokens)))
    return rows


def _routing_only(layer, hidden, routing: LayerRouting, rope):
    """Everything the routed forward does except the decoder layer's own sub-modules."""
    logits = layer.router(hidden)
    weights = layer.weight_norm(logits, routing.target_mask)
    selection = select_tokens(logits, routing.target_mask, routing.valid_mask, routing.plan)
    compact = gather_tokens(hidden, selection.compact_index)
    cos, sin = rope
    gather_tokens(cos, selection.compact_index), gather_tokens(sin, selection.compact_index)
    scale = torch.where(routing.target_mask, weights, weights.new_ones(())).to(hidden.dtype)
    compact_out = compact * gather_tokens(scale, selection.compact_index).unsqueeze(-1)
    processed = gather_tokens(compact_out, selection.full_to_compact)
    return torch.where(selection.kept.unsqueeze(-1), processed, hidden * scale.unsqueeze(-1))
