"""p-MoD variants of transformers' own decoder layer classes: the same sub-modules and state-dict keys, plus a
router (``layers.{i}.router.router.*``), routed when the model's :class:`ForwardSession` says so. A
training-free reducer's layers are the same variant without a router.

The layer stays an instance of its transformers class, so transformers' hooks (hidden-state recording,
gradient checkpointing) keep working. The session reaches the layers through :class:`PmodState`, shared by
the model and its layers; it lives until the next forward, so that gradient checkpointing's recomputation in
the backward pass routes exactly as the forward did.
"""

from __future__ import annotations

from torch import nn

from pmod.layer import routed_forward
from pmod.routing import TokenRouter
from pmod.session import ForwardSession
from pmod.weight_norm import WeightNorm


class PmodState:
    """What the model shares with its p-MoD layers: the current forward's session."""

    def __init__(self):
        self.session: ForwardSession | None = None


_LAYER_CLASSES: dict[type, type] = {}


def pmod_layer_class(base: type) -> type:
    """The p-MoD subclass of a transformers decoder layer class (made once per class)."""
    if base not in _LAYER_CLASSES:

        def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                    position_embeddings=None, **kwargs):
            session = self.pmod_state.session
            index = self.self_attn.layer_idx
            if session is not None:
                session.before_layer(index, self, hidden_states, position_embeddings)
                routing = session.layer_routing(index)
                if routing is not None:
                    output = routed_forward(self, self.router, self.weight_norm, hidden_states, routing,
                                            position_embeddings, use_cache, **kwargs)
                    session.routed(index)
                    return output
                if session.is_compact(index):
                    attention_mask = session.compact_mask(index)
            return base.forward(self, hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=use_cache, position_embeddings=position_embeddings, **kwargs)

        forward.__doc__ = f"{base.__name__}.forward, on the kept tokens when p-MoD routes this layer."
        _LAYER_CLASSES[base] = type(f"Pmod{base.__name__}", (base,), {"forward": forward})
    return _LAYER_CLASSES[base]


def make_pmod_layer(layer: nn.Module, router: TokenRouter | None, weight_norm: WeightNorm | None,
                    state: PmodState) -> None:
    """Turn a transformers decoder layer into its p-MoD variant, in place; without a router (a training-free
    reducer's layer) the session chooses its tokens."""
    layer.__class__ = pmod_layer_class(type(layer))
    layer.router = router
    layer.weight_norm = weight_norm
    layer.pmod_state = state
