"""A KV cache whose p-MoD layers hold only the tokens they kept at prefill.

After a routed prefill, p-MoD layer l caches each sample's text tokens plus its k_l kept vision tokens in a
compact, right-padded layout: its key axis is shorter than the sequence, and rows of a batch may end at
different slots. Each such layer is a :class:`CompactLayer`, which knows which of its slots are real, and
reports its own key length as the query offset to transformers' masking, so any number of new tokens can
follow a filled cache (decode steps, a second chat turn, chunked text).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class CompactLayer(DynamicLayer):
    """The cache of one p-MoD layer: a DynamicLayer plus which prefill slots of each row hold real tokens."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._forget_prefill()

    def _forget_prefill(self) -> None:
        self.prefill_slots = 0
        self.row_lengths: torch.Tensor | None = None  # [B] real prefill slots per row; None: all rows are full
        self.pattern: tuple[int, ...] | None = None  # host per-row lengths at prefill; None: no routed prefill

    @property
    def is_compact(self) -> bool:
        return self.pattern is not None

    def record_prefill(self, row_lengths: torch.Tensor, host_lengths: tuple[int, ...]) -> None:
        """After a routed prefill: ``host_lengths`` real tokens per row, the longest row sets the slot count.

        ``pattern`` keeps the host lengths as a key: layers that kept the same lengths share one decode mask,
        and stay alike under batch reordering, which moves the rows of every layer the same way.
        """
        self.prefill_slots = max(host_lengths)
        self.row_lengths = None if min(host_lengths) == self.prefill_slots else row_lengths
        self.pattern = tuple(host_lengths)

    def prefill_valid(self) -> torch.Tensor | None:
        """[B, prefill slots] bool: which prefill slots are real (None: all of them)."""
        if self.row_lengths is None:
            return None
        slots = torch.arange(self.prefill_slots, device=self.row_lengths.device)
        return slots < self.row_lengths[:, None]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.row_lengths is not None:
            self.row_lengths = self.row_lengths.index_select(0, beam_idx.to(self.row_lengths.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.row_lengths is not None:
            self.row_lengths = self.row_lengths.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.row_lengths is not None:
            self.row_lengths = self.row_lengths[indices]

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_compact:
            raise NotImplementedError("Cropping a p-MoD cache (assisted decoding) is not supported.")
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self._forget_prefill()


class PmodCache(DynamicCache):
    """DynamicCache whose p-MoD layers (``config.mod_target_layer_indices``) are :class:`CompactLayer`s.

    ``get_seq_length`` answers "tokens processed so far" for every layer (generation reads it for positions);
    ``get_query_offset`` answers "keys this layer holds", which is what a causal mask needs.
    """

    def __init__(self, *args, config=None, **kwargs):
        super().__init__(*args, config=config, **kwargs)
        for index in getattr(config, "mod_target_layer_indices", None) or ():
            self.layers[index] = CompactLayer()
        self.seen_tokens = 0
        self.prefill_vision: tuple[int, ...] | None = None  # vision tokens per row at the routed prefill
        self.added_tokens_may_pad = False  # a multi-token step after prefill came with an attention mask

    def compact_layer(self, layer_idx: int) -> CompactLayer | None:
        """The layer's cache if it holds a routed prefill's compact layout, else None."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return layer if isinstance(layer, CompactLayer) and layer.is_compact else None

    def record_routed_prefill(self, layer_idx: int, row_lengths: torch.Tensor, host_lengths: tuple[int, ...]) -> None:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if not isinstance(layer, CompactLayer):
            raise TypeError(
                f"layer {layer_idx} of this PmodCache is not a p-MoD layer: build it as PmodCache(config=model.config)"
            )
        layer.record_prefill(row_lengths, host_lengths)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.compact_layer(layer_idx) is not None:
            return self.seen_tokens
        return super().get_seq_length(layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        layer = self.compact_layer(layer_idx)
        if layer is not None:
            return layer.get_seq_length()
        return super().get_query_offset(layer_idx)

    def key_valid(self, layer_idx: int, attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
        """[B, keys after this step] bool for a compact layer: real prefill slots, then the tokens added since.

        Tokens added after prefill are real unless the full-sequence ``attention_mask`` says otherwise; it is read
        only once a multi-token step has come with a mask (single-token decode steps are real tokens). None: every
        key is real. Device work only: no value is read on the host.
        """
        layer = self.compact_layer(layer_idx)
        prefill = layer.prefill_valid()
        added = layer.get_seq_length() - layer.prefill_slots + query_length
        read_mask = attention_mask is not None and attention_mask.ndim == 2 and (
            query_length > 1 or self.added_tokens_may_pad)
        if prefill is None and not read_mask:
            return None
        reference = prefill if prefill is not None else attention_mask
        batch, device = reference.shape[0], reference.device
        if prefill is None:
            prefill = torch.ones(batch, layer.prefill_slots, dtype=torch.bool, device=device)
        later = attention_mask[:, attention_mask.shape[1] - added:].bool() if read_mask else \
            torch.ones(batch, added, dtype=torch.bool, device=device)
        return torch.cat([prefill, later], dim=1)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0
        self.prefill_vision = None
        self.added_tokens_may_pad = False
