"""One forward pass of a p-MoD model: what each decoder layer is given, decided once and shared.

A model with p-MoD layers (our LLaVA class, or a transformers-native VLM through ``pmod.hf``) opens a
:class:`ForwardSession` per forward. At a routed prefill the session holds the per-batch plans (host counts,
one host-to-device copy) and one compact causal mask per kept length; after prefill it builds one mask per
kept-length pattern for the compact cache layers, on the device with no host read. ``finish()`` records in
the :class:`PmodCache` what later steps need.

Routed layers run their kept tokens packed when samples keep different numbers of tokens, and always when the
input itself is packed (``--packing``); the plans then carry each layer's packed row, built in the same
host-to-device copy. A cache filled by a packed layer stores the compact layout as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask

from pmod.cache import PmodCache
from pmod.hf_compat import cache_kwargs
from pmod.layer import LayerRouting
from pmod.packing import TokenRows
from pmod.reducers import ReducerSpec
from pmod.reduction import TokenReduction
from pmod.routing import LayerPlan, TokenCounts, build_layer_plans
from pmod.schedule import RetentionSchedule


@dataclass(frozen=True)
class RoutingInputs:
    """The tokens a routed forward may skip (targets), the real ones (valid), and their host counts."""

    target_mask: torch.Tensor  # [B, L] bool
    valid_mask: torch.Tensor  # [B, L] bool
    counts: TokenCounts


def routing_inputs(cache, past_length: int, length: int, target_mask: torch.Tensor,
                   attention_mask: torch.Tensor | None, counts: TokenCounts | None) -> RoutingInputs | None:
    """What this forward routes, or None when the cache already holds the prompt's routing.

    Routing happens at prefill, from an empty cache. With a filled cache the routing inputs belong to the
    prompt: a decode step of ``generate()``, or a longer prompt that continues the cached one, whose new tokens
    must then be text.
    """
    width = target_mask.shape[1]
    if past_length > 0:
        if width == length:
            raise NotImplementedError("p-MoD routes at prefill from an empty cache only (no chunked prefill)")
        if width == past_length + length and getattr(cache, "prefill_vision", None) is not None:
            if counts is None or len(counts.n_target) != target_mask.shape[0]:
                valid = None if attention_mask is None else attention_mask.bool()
                counts = TokenCounts.from_masks(target_mask.bool(), valid)
            if counts.n_target != cache.prefill_vision:
                raise NotImplementedError(
                    "p-MoD routes vision tokens at prefill only: tokens that continue a filled cache must be "
                    "text. Start a new prompt (without the cache) to add an image."
                )
        return None
    if cache is not None and not isinstance(cache, PmodCache):
        raise TypeError(f"a routed p-MoD prefill needs a PmodCache(config=model.config), got {type(cache).__name__}")
    if width != length:
        raise ValueError(f"the routing mask covers {width} tokens but the input has {length}")
    valid_mask = torch.ones_like(target_mask, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    target_mask = target_mask.bool() & valid_mask
    if counts is None or len(counts.n_target) != target_mask.shape[0]:
        counts = TokenCounts.from_masks(target_mask, valid_mask)
    return RoutingInputs(target_mask, valid_mask, counts)


def packed_routing_inputs(target_mask: torch.Tensor, rows: TokenRows, counts: TokenCounts | None) -> RoutingInputs:
    """Routing inputs of a packed ``[1, sum L]`` input, in the ``[B, W]`` row view that selection ranks in."""
    target_rows = rows.to_rows(target_mask.reshape(-1).bool()) & rows.valid
    if counts is None or len(counts.n_target) != target_rows.shape[0]:
        counts = TokenCounts.from_masks(target_rows, rows.valid)
    return RoutingInputs(target_rows, rows.valid, counts)


def packs_kept_tokens(counts: TokenCounts, input_rows: TokenRows | None, allowed: bool = True) -> bool:
    """Packed kept tokens pay off when samples keep different numbers of tokens, and a packed input needs
    packed layers. ``allowed`` False keeps the padded layout (benchmarks compare both)."""
    if input_rows is not None:
        return True
    return allowed and (len(set(counts.n_valid)) > 1 or len(set(counts.n_target)) > 1)


def check_mask_width(attention_mask, cache, past_length: int, length: int) -> None:
    """Compact layers read the tokens added after prefill from the end of a full-sequence attention mask."""
    if attention_mask is None or attention_mask.ndim != 2 or not isinstance(cache, PmodCache) or past_length == 0:
        return
    if not cache.accepts_mask_width(attention_mask.shape[1], past_length, length):
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[1]} tokens; with a filled p-MoD cache it must cover the "
            f"{past_length} cached tokens and the {length} new ones"
        )


class ForwardSession:
    """The routing plans and shared masks of one forward; layers ask it what to do."""

    def __init__(self, config, schedule: RetentionSchedule | None, cache, attention_mask: torch.Tensor | None,
                 hidden: torch.Tensor, past_length: int, routing: RoutingInputs | None,
                 reducer: ReducerSpec | None = None, input_rows: TokenRows | None = None,
                 pack_kept_tokens: bool = True):
        """``input_rows``: the row maps of a packed input (``routing`` is then in row view)."""
        self.config = config
        self.cache = cache if isinstance(cache, PmodCache) else None
        self.attention_mask = attention_mask
        self.batch, self.length = hidden.shape[:2]
        self.past_length = past_length
        self.routing = routing
        self.rows: TokenRows | None = None
        self.plans: dict[int, LayerPlan] = {}
        if self.cache is not None:
            self.cache.begin_forward(past_length, self.length, routing is not None)
        if routing is not None:
            packed = packs_kept_tokens(routing.counts, input_rows, pack_kept_tokens)
            self.plans = build_layer_plans(schedule, routing.counts, hidden.device, packed=packed)
            if packed:
                self.rows = input_rows if input_rows is not None else TokenRows.padded(self.batch, self.length,
                                                                                       hidden.device)
        self._like = hidden
        self._prefill_masks: dict[int, object] = {}  # by compact length (caches are empty at prefill)
        self._cached_masks: dict[tuple, object] = {}  # by kept-length pattern
        self.reduction = TokenReduction(reducer, routing, self.plans) if reducer is not None and self.plans else None

    def before_layer(self, index: int, layer, hidden: torch.Tensor, position_embeddings) -> None:
        """Let a training-free reducer rank the tokens from this layer's input (a no-op for p-MoD)."""
        if self.reduction is not None:
            self.reduction.before_layer(index, layer, hidden, position_embeddings)

    def layer_routing(self, index: int) -> LayerRouting | None:
        """The routing of p-MoD layer ``index`` at a routed prefill (None: the layer is not routed now)."""
        plan = self.plans.get(index)
        if plan is None:
            return None
        selection = self.reduction.selection if self.reduction is not None else None
        if self.rows is not None:
            return LayerRouting(plan, self.routing.target_mask, self.routing.valid_mask, None, selection, self.rows)
        if plan.max_kept_length not in self._prefill_masks:
            self._prefill_masks[plan.max_kept_length] = create_causal_mask(
                config=self.config, inputs_embeds=self._like.new_empty(self.batch, plan.max_kept_length, 0),
                attention_mask=None, position_ids=None, layer_idx=index, **cache_kwargs(self.cache),
            )
        mask = self._prefill_masks[plan.max_kept_length]
        return LayerRouting(plan, self.routing.target_mask, self.routing.valid_mask, mask, selection)

    def routed(self, index: int) -> None:
        """After routed layer ``index`` ran: its cache holds the compact layout the plan describes."""
        if self.cache is not None:
            plan = self.plans[index]
            self.cache.record_routed_prefill(index, plan.kept_lengths_tensor, plan.kept_lengths)

    def is_compact(self, index: int) -> bool:
        return self.cache is not None and self.cache.compact_layer(index) is not None

    def compact_mask(self, index: int):
        """Mask of this forward's tokens against compact cache layer ``index`` (shared by its pattern).

        The layer's query offset is its own key length (``PmodCache.get_query_offset``), and the is-causal skip
        is not allowed, since deciding it would read the padding mask on the host.
        """
        pattern = self.cache.compact_layer(index).pattern
        if pattern not in self._cached_masks:
            valid = self.cache.key_valid(index, self.attention_mask, self.length)
            self._cached_masks[pattern] = None if valid is None and self.length == 1 else create_causal_mask(
                config=self.config, inputs_embeds=self._like, attention_mask=valid, position_ids=None,
                layer_idx=index, allow_is_causal_skip=False, **cache_kwargs(self.cache),
            )
        return self._cached_masks[pattern]

    def finish(self) -> None:
        """Record in the cache what later forwards need: tokens seen, vision counts, padding in added tokens."""
        if self.cache is None:
            return
        if self.plans:
            self.cache.prefill_vision = self.routing.counts.n_target
        elif self._cached_masks and self.length > 1 and self.attention_mask is not None:
            self.cache.added_tokens_may_pad = True
        self.cache.advance(self.past_length, self.length)
