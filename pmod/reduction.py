"""One routed forward of a training-free reducer: which tokens survive each drop stage, decided on the device.

At the layer that scores a stage (FastV: the one before the drop; PyramidDrop: the drop layer itself), the
scores of the still-kept vision tokens are computed and the stage's keep count (from the host plan) taken
with the same top-k as p-MoD. Later layers of the stage reuse that selection; the next stage ranks only the
tokens the previous one kept, so a dropped token never comes back.
"""

from __future__ import annotations

import torch

from pmod.attention_score import last_valid_index, query_row_attention
from pmod.reducers import ReducerSpec, host_scores
from pmod.routing import LayerPlan, Selection, select_tokens


class TokenReduction:
    def __init__(self, spec: ReducerSpec, routing, plans: dict[int, LayerPlan]):
        self.spec = spec
        self.routing = routing
        self.plans = plans
        self.selection: Selection | None = None
        self._alive = routing.valid_mask
        self._score_layers = {drop + spec.score_layer_offset: drop for drop in spec.drop_layers}
        self._host_scores = self._query = None
        if spec.uses_attention:
            self._query = last_valid_index(routing.valid_mask)  # the last prompt token ranks every stage
        else:
            first = plans[spec.drop_layers[0]]
            scores = host_scores(spec, routing.counts.n_target, first.keep_counts)
            self._host_scores = scores.to(routing.target_mask.device, non_blocking=True)

    def before_layer(self, index: int, layer, hidden: torch.Tensor, position_embeddings) -> None:
        drop = self._score_layers.get(index)
        if drop is None:
            return
        target = self.routing.target_mask
        if self.spec.uses_attention:
            scores = query_row_attention(layer, hidden, position_embeddings, self._alive, self._query)
        else:
            ordinal = (target.long().cumsum(dim=1) - 1).clamp(min=0, max=self._host_scores.shape[1] - 1)
            scores = self._host_scores.gather(1, ordinal)
        scores = scores.masked_fill(~(target & self._alive), float("-inf"))
        self.selection = select_tokens(scores, target, self.routing.valid_mask, self.plans[drop])
        self._alive = self.selection.kept
