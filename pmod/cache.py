"""A KV cache whose p-MoD layers hold only the tokens they kept at prefill.

After a routed prefill, p-MoD layer l caches each sample's text tokens plus its k_l kept vision tokens in a
compact, right-padded layout: its key axis is shorter than the sequence, and rows of a batch may end at
different slots. Each such layer is a :class:`CompactLayer`, which knows which of its slots are real, and
reports its own key length as the query offset to transformers' masking, so any number of new tokens can
follow a filled cache (decode steps, a second chat turn, chunked text).

Every layer writes new tokens into a preallocated buffer (:class:`GrowableLayer`) instead of concatenating:
transformers' DynamicLayer copies the whole cache of every layer at every decode step, which on long
multimodal prompts moves as many bytes as the attention reads. ``pmod.static_cache`` stores the same compact
layout (:class:`CompactRecord`) in fixed-capacity buffers, for compiled decoding.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowableLayer(DynamicLayer):
    """A DynamicLayer that writes new keys and values into preallocated buffers.

    ``keys`` / ``values`` are views of the buffers' first ``length`` slots, so whatever reads them (attention,
    masks, ``get_seq_length``) sees what a DynamicLayer holds. A full buffer grows by ``max(256, length // 8)``
    slots at once: one copy per growth instead of one per step, for at most an eighth more memory. New keys
    that need gradients are concatenated as DynamicLayer does (in-place writes would break autograd).
    """

    MIN_GROWTH = 256

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.requires_grad or value_states.requires_grad:
            self._buffers = None
            return super().update(key_states, value_states, *args, **kwargs)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if self._buffers is None or end > self._buffers[0].shape[-2]:
            self._grow(key_states, value_states, start, end)
        for buffer, states in zip(self._buffers, (key_states, value_states)):
            buffer[..., start:end, :].copy_(states)
        self._view(end)
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, end: int) -> None:
        capacity = end + max(self.MIN_GROWTH, end // 8)
        grown = []
        for states, held in zip((key_states, value_states), (self.keys, self.values)):
            buffer = states.new_empty(*states.shape[:-2], capacity, states.shape[-1])
            if start:
                buffer[..., :start, :].copy_(held)
            grown.append(buffer)
        self._buffers = tuple(grown)

    def _view(self, length: int) -> None:
        self.keys = self._buffers[0][..., :length, :]
        self.values = self._buffers[1][..., :length, :]

    def _rebuffer(self, operation) -> None:
        """Apply a batch operation (reorder, repeat, select) to the buffers and keep the views on them."""
        length = self.get_seq_length()
        if self._buffers is None or length == 0:
            return
        self._buffers = tuple(operation(buffer) for buffer in self._buffers)
        self._view(length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._buffers is None:
            return super().reorder_cache(beam_idx)
        self._rebuffer(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._buffers is None:
            return super().batch_repeat_interleave(repeats)
        self._rebuffer(lambda buffer: buffer.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._buffers is None:
            return super().batch_select_indices(indices)
        self._rebuffer(lambda buffer: buffer[indices, ...])

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self._buffers is not None and self.is_initialized:
            self._view(self.get_seq_length())

    def offload(self):
        self._buffers = None
        super().offload()

    def reset(self) -> None:
        self._buffers = None
        super().reset()


class CompactRecord:
    """What makes a cache layer compact, whatever stores its keys: which prefill slots of each row hold real
    tokens. Mixed in before a storage layer (growable, concatenating or static), whose ``update`` stores."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._forget_prefill()

    def _forget_prefill(self) -> None:
        self.prefill_slots = 0
        self.row_lengths: torch.Tensor | None = None  # [B] real prefill slots per row; None: all rows are full
        self.pattern: tuple[int, ...] | None = None  # host per-row lengths at prefill; None: no routed prefill
        self._packed: tuple[torch.Tensor, int, int] | None = None  # the next update's packed layout

    @property
    def is_compact(self) -> bool:
        return self.pattern is not None

    def expect_packed(self, slots: torch.Tensor, batch: int, width: int) -> None:
        """The next update brings a packed ``[1, H, sum Lk, d]`` prefill: real slot ``slots[i]`` of the
        ``[batch, width]`` compact grid is packed token i (``pmod.routing.PackedKept``)."""
        self._packed = (slots, batch, width)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """A packed prefill is stored in the compact ``[B, H, Lk_max, d]`` layout (filler slots zero) and
        attended as it came; any other update is stored as it comes."""
        if self._packed is None:
            return super().update(key_states, value_states, *args, **kwargs)
        slots, batch, width = self._packed
        self._packed = None
        grids = []
        for states in (key_states, value_states):
            heads, dim = states.shape[1], states.shape[-1]
            grid = states.new_zeros(batch * width, heads, dim).index_copy_(0, slots, states[0].transpose(0, 1))
            grids.append(grid.view(batch, width, heads, dim).transpose(1, 2))
        super().update(*grids, *args, **kwargs)
        return key_states, value_states

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


class CompactLayer(CompactRecord, GrowableLayer):
    """The cache of one p-MoD layer in preallocated, growing buffers."""


class ConcatenatingCompactLayer(CompactRecord, DynamicLayer):
    """A compact layer that grows by concatenation, as transformers' DynamicLayer does."""


class PmodCache(DynamicCache):
    """DynamicCache whose p-MoD layers (``config.mod_target_layer_indices``) are :class:`CompactLayer`s.

    ``get_seq_length`` answers "tokens processed so far" for every layer (generation reads it for positions);
    ``get_query_offset`` answers "keys this layer holds", which is what a causal mask needs.
    """

    def __init__(self, *args, config=None, preallocate: bool = True, **kwargs):
        """``preallocate=False`` keeps transformers' concatenating layers for the dense layers and the compact
        layers' growth (the reference the preallocated buffers are tested and benchmarked against)."""
        super().__init__(*args, config=config, **kwargs)
        if preallocate:
            for index, layer in enumerate(self.layers):
                if type(layer) is DynamicLayer:
                    self.layers[index] = GrowableLayer()
        for index in getattr(config, "mod_target_layer_indices", None) or ():
            self.layers[index] = CompactLayer() if preallocate else ConcatenatingCompactLayer()
        self.seen_tokens = 0
        self.prefill_vision: tuple[int, ...] | None = None  # vision tokens per row at the routed prefill
        self.added_tokens_may_pad = False  # a multi-token step after prefill came with an attention mask

    def begin_forward(self, past_length: int, length: int, routed: bool) -> None:
        """Called before the layers run (``length`` new tokens after ``past_length``); a cache that grows needs
        nothing here, a fixed-capacity one (``pmod.static_cache``) checks and sizes itself."""

    def advance(self, past_length: int, length: int) -> None:
        """After a forward of ``length`` tokens that followed ``past_length`` cached ones."""
        self.seen_tokens = past_length + length

    def accepts_mask_width(self, width: int, past_length: int, length: int) -> bool:
        """A step's 2D padding mask covers the cached tokens and the new ones."""
        return width == past_length + length

    def compact_layer(self, layer_idx: int) -> CompactRecord | None:
        """The layer's cache if it holds a routed prefill's compact layout, else None."""
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        return layer if isinstance(layer, CompactRecord) and layer.is_compact else None

    def record_routed_prefill(self, layer_idx: int, row_lengths: torch.Tensor, host_lengths: tuple[int, ...]) -> None:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if not isinstance(layer, CompactRecord):
            raise TypeError(
                f"layer {layer_idx} of this PmodCache is not a p-MoD layer: build it as PmodCache(config=model.config)"
            )
        layer.record_prefill(row_lengths, host_lengths)

    def expect_packed_prefill(self, layer_idx: int, slots: torch.Tensor, batch: int, width: int) -> None:
        """Layer ``layer_idx``'s routed prefill runs packed: store it in the compact layout."""
        self.layers[layer_idx].expect_packed(slots, batch, width)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.compact_layer(layer_idx) is not None:
            return self.seen_tokens
        return super().get_seq_length(layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        layer = self.compact_layer(layer_idx)
        if layer is not None:
            return layer.get_seq_length()
        return super().get_query_offset(layer_idx)

    def reads_added_tokens_mask(self, attention_mask: torch.Tensor | None, query_length: int) -> bool:
        """Whether a compact layer's mask reads the tokens added after prefill from the 2D ``attention_mask``:
        only once a multi-token step has come with a mask (single-token decode steps are real tokens)."""
        return attention_mask is not None and attention_mask.ndim == 2 and (
            query_length > 1 or self.added_tokens_may_pad)

    def key_valid(self, layer_idx: int, attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor | None:
        """[B, keys after this step] bool for a compact layer: real prefill slots, then the tokens added since.

        Tokens added after prefill are real unless the full-sequence ``attention_mask`` says otherwise; it is read
        only once a multi-token step has come with a mask (single-token decode steps are real tokens). None: every
        key is real. Device work only: no value is read on the host.
        """
        layer = self.compact_layer(layer_idx)
        prefill = layer.prefill_valid()
        added = layer.get_seq_length() - layer.prefill_slots + query_length
        read_mask = self.reads_added_tokens_mask(attention_mask, query_length)
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
