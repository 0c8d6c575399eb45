"""A KV cache whose p-MoD layers hold only the tokens they kept at prefill.

After prefill, p-MoD layer l caches each sample's text tokens plus its k_l kept vision tokens in a compact,
right-padded layout, so its cache is shorter than a dense layer's and rows of a batch may end at different
slots. The cache remembers those per-sample lengths so that decode steps can mask the filler slots.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache


class PmodCache(DynamicCache):
    """DynamicCache plus, per compact layer, how many prefill slots of each row are real tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.compact_lengths: dict[int, torch.Tensor | None] = {}
        self.compact_prefill_length: dict[int, int] = {}
        self.seen_tokens = 0

    def record_compact_prefill(self, layer_idx: int, lengths: torch.Tensor, prefill_length: int,
                               uniform: bool) -> None:
        """``uniform``: every row filled all ``prefill_length`` slots, so decode steps need no padding mask."""
        self.compact_lengths[layer_idx] = None if uniform else lengths
        self.compact_prefill_length[layer_idx] = prefill_length

    def is_compact(self, layer_idx: int) -> bool:
        return layer_idx in self.compact_lengths

    def key_padding_mask(self, layer_idx: int, query_length: int) -> torch.Tensor | None:
        """[B, cache length + query_length] bool: real prefill slots, then every token added since (None: all real)."""
        lengths = self.compact_lengths[layer_idx]
        if lengths is None:
            return None
        prefill = self.compact_prefill_length[layer_idx]
        added = self.layers[layer_idx].get_seq_length() - prefill + query_length
        prefill_valid = torch.arange(prefill, device=lengths.device) < lengths[:, None]
        return torch.cat([prefill_valid, prefill_valid.new_ones(lengths.shape[0], added)], dim=1)

    def prefill_row_lengths(self, layer_idx: int) -> list[int]:
        """Real tokens each row of a compact layer cached at prefill (text + kept vision tokens)."""
        lengths = self.compact_lengths[layer_idx]
        if lengths is None:
            return [self.compact_prefill_length[layer_idx]] * self.layers[layer_idx].keys.shape[0]
        return lengths.tolist()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far for a compact layer (generation reads layer 0 as 'tokens processed')."""
        if self.is_compact(layer_idx):
            return self.seen_tokens
        return super().get_seq_length(layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for layer_idx, lengths in self.compact_lengths.items():
            if lengths is not None:
                self.compact_lengths[layer_idx] = lengths.index_select(0, beam_idx.to(lengths.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for layer_idx, lengths in self.compact_lengths.items():
            if lengths is not None:
                self.compact_lengths[layer_idx] = lengths.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for layer_idx, lengths in self.compact_lengths.items():
            if lengths is not None:
                self.compact_lengths[layer_idx] = lengths[indices]

    def crop(self, max_length: int) -> None:
        if self.compact_lengths:
            raise NotImplementedError("Cropping a p-MoD cache (assisted decoding) is not supported.")
        super().crop(max_length)

    def reset(self) -> None:
        super().reset()
        self.compact_lengths.clear()
        self.compact_prefill_length.clear()
        self.seen_tokens = 0
