"""A fixed-capacity p-MoD cache, so decode steps can run compiled (``torch.compile``, CUDA graphs on a GPU).

Every layer allocates its keys and values once, at prefill, and later steps write into them in place: the shapes
a decode step sees never change, so one compiled step serves the whole generation. A compact (p-MoD) layer keeps
its saving: its capacity is the slots its prefill filled (text plus the kept vision tokens of its longest row)
plus the tokens that may follow, not the whole sequence. A decode step attends over a layer's full capacity;
its mask comes from device lengths (filled slots per layer, real prefill slots per row), so no value is read on
the host.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import CacheLayerMixin

from pmod.cache import CompactRecord, PmodCache


def _pin_address(*tensors: torch.Tensor) -> None:
    """Tell dynamo these tensors keep their address across steps (CUDA graphs replay them without copies)."""
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)


class StaticBufferLayer(CacheLayerMixin):
    """Keys and values in ``[B, H, capacity, d]`` buffers written in place; ``filled`` (a device scalar) counts
    the slots in use.

    The prefill that allocates the buffers is attended over its own slots only (it is not compiled, and its
    mask is the usual causal one); later updates return the whole buffers, and masks cover the capacity.
    """

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, capacity: int, **kwargs):
        super().__init__()
        self.capacity = capacity
        self.filled = torch.zeros((), dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.keys = key_states.new_zeros(*key_states.shape[:-2], self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(*value_states.shape[:-2], self.capacity, value_states.shape[-1])
        self.filled = self.filled.to(self.device)
        _pin_address(self.keys, self.values, self.filled)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        count = key_states.shape[-2]
        if not self.is_initialized:
            if count > self.capacity:
                raise ValueError(f"a static cache layer holds {self.capacity} tokens, the prompt brings {count}")
            self.lazy_initialization(key_states, value_states)
            self.keys[..., :count, :].copy_(key_states)
            self.values[..., :count, :].copy_(value_states)
            self.filled.fill_(count)
            return key_states, value_states
        slots = torch.arange(count, device=self.device) + self.filled
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        self.filled.add_(count)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return (self.capacity if self.is_initialized else query_length), 0

    def get_seq_length(self):
        """Slots in use, as a device scalar (a host int would be read from the device at every step)."""
        return self.filled if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.capacity

    def _in_place(self, operation) -> None:
        """Batch operations keep the buffers' addresses (a compiled step captured them)."""
        if self.is_initialized:
            for buffer in (self.keys, self.values):
                buffer.copy_(operation(buffer))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._in_place(lambda buffer: buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a static cache is sized at prefill: expand the batch before it")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("a static cache is sized at prefill: select rows before it")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a static p-MoD cache cannot be cropped (assisted decoding is not supported)")

    def reset(self) -> None:
        """Back to empty; the next prefill allocates again (its batch and lengths may differ)."""
        self.keys = self.values = None
        self.filled = torch.zeros((), dtype=torch.long)
        self.is_initialized = False


class StaticCompactLayer(CompactRecord, StaticBufferLayer):
    """A p-MoD layer's static cache: its capacity is set at the routed prefill (``reserve``), from the slots the
    prefill fills plus ``headroom`` tokens after it."""

    def __init__(self, capacity: int, **kwargs):
        super().__init__(capacity=capacity, **kwargs)
        self.sequence_capacity = capacity  # without a routed prefill the layer holds every token
        self.headroom: int | None = None

    def reserve(self, headroom: int | None) -> None:
        """Tokens that may follow the next prefill (None: the prefill is not routed)."""
        self.headroom = headroom

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        routed = self.headroom is not None
        self.capacity = key_states.shape[-2] + self.headroom if routed else self.sequence_capacity
        super().lazy_initialization(key_states, value_states)


class PmodStaticCache(PmodCache):
    """A :class:`PmodCache` of fixed capacity: ``max_cache_len`` tokens per sequence (prompt plus new tokens), as
    transformers' StaticCache. ``generate`` compiles its decode steps on a GPU (or wherever ``compile_config``
    allows), and the shapes they see stay the same from the first step to the last.

    A compiled step must not read or write the host count of tokens seen: it changes every step, so it would
    be an input of the compiled graph, and CUDA graphs record one graph per value. Compiled steps count on the
    device instead, and the host count catches up (one read) when eager code next asks for it. Inside a
    compiled step the cache reports the prompt length, which answers all the host asks there: the cache is
    filled, and routing happened at the prompt.
    """

    def __init__(self, config, max_cache_len: int, **kwargs):
        self._host_seen = 0
        self._compiled_tokens: torch.Tensor | None = None  # tokens added by compiled steps, not yet on the host
        self._compiled_pending = False
        super().__init__(config=config, **kwargs)
        self.sequence_capacity = max_cache_len
        compact = set(getattr(config, "mod_target_layer_indices", None) or ())
        for index in range(len(self.layers)):
            kind = StaticCompactLayer if index in compact else StaticBufferLayer
            self.layers[index] = kind(capacity=max_cache_len)
        self.prompt_length = 0

    @property
    def seen_tokens(self) -> int:
        if torch.compiler.is_compiling():
            return self.prompt_length
        if self._compiled_pending:
            self._host_seen += int(self._compiled_tokens)
            self._compiled_tokens.zero_()
            self._compiled_pending = False
        return self._host_seen

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        self._host_seen = value

    def advance(self, past_length: int, length: int) -> None:
        if not torch.compiler.is_compiling():
            super().advance(past_length, length)
            if self._compiled_tokens is None:  # allocated by the eager prefill, before any compiled step
                device = next(layer.keys.device for layer in self.layers if layer.is_initialized)
                self._compiled_tokens = torch.zeros((), dtype=torch.long, device=device)
                _pin_address(self._compiled_tokens)
            return
        self._compiled_tokens.add_(length)
        self._compiled_pending = True

    def begin_forward(self, past_length: int, length: int, routed: bool) -> None:
        """Refuse a step the capacity cannot hold; a routed prefill sizes the compact layers from the prompt."""
        if torch.compiler.is_compiling():
            return  # the step's mask was checked on the host (llava_llama.padded_decode_mask)
        if past_length + length > self.sequence_capacity:
            raise ValueError(
                f"the static cache holds {self.sequence_capacity} tokens (max_cache_len); this step needs "
                f"{past_length + length}: build PmodStaticCache with max_cache_len >= prompt + max_new_tokens"
            )
        if past_length == 0:
            self.prompt_length = length
            for layer in self.layers:
                if isinstance(layer, StaticCompactLayer):
                    layer.reserve(self.sequence_capacity - length if routed else None)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed so far, for every layer (a host int: positions and checks read it)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """Tokens per sequence (``max_cache_len``); a compact layer's own capacity is smaller."""
        return self.sequence_capacity if layer_idx is None else self.layers[layer_idx].get_max_length()

    def get_query_offset(self, layer_idx: int = 0):
        return self.layers[layer_idx].get_seq_length()

    def key_valid(self, layer_idx: int, attention_mask: torch.Tensor | None, query_length: int) -> torch.Tensor:
        """[B, capacity] bool for a compact layer: its real prefill slots, then one slot per token after the
        prompt. Those are real unless the full-sequence ``attention_mask`` says otherwise; slots not written yet
        are hidden by the causal part of the mask. Always a tensor: without a mask, attention would read the
        empty slots. Shapes depend on the capacity only, not on the step."""
        layer = self.compact_layer(layer_idx)
        prefill = layer.prefill_valid()
        batch, device = layer.keys.shape[0], layer.keys.device
        if prefill is None:
            prefill = torch.ones(batch, layer.prefill_slots, dtype=torch.bool, device=device)
        later_slots = layer.capacity - layer.prefill_slots
        if self.reads_added_tokens_mask(attention_mask, query_length):
            full = torch.nn.functional.pad(attention_mask, (0, self.sequence_capacity - attention_mask.shape[1]))
            later = full[:, self.prompt_length:self.prompt_length + later_slots].to(device=device, dtype=torch.bool)
        else:
            later = torch.ones(batch, later_slots, dtype=torch.bool, device=device)
        return torch.cat([prefill, later], dim=1)

    def accepts_mask_width(self, width: int, past_length: int, length: int) -> bool:
        """A decode step's mask may come padded to the capacity (``llava_llama.padded_decode_mask``)."""
        return (length == 1 and width == self.sequence_capacity) or width == past_length + length

    def reset(self) -> None:
        super().reset()
        self.prompt_length = 0
        self._compiled_pending = False
        if self._compiled_tokens is not None:
            self._compiled_tokens.zero_()


def new_generation_cache(config, generation_config, prompt_length: int, generation: dict) -> PmodCache:
    """The cache a p-MoD ``generate`` starts from: a :class:`PmodCache`, or with ``cache_implementation="static"``
    (in ``generation`` or the model's generation config) a :class:`PmodStaticCache` of ``prompt_length +
    max_new_tokens``. The option is taken out of ``generation`` (and of a generation config, by a copy):
    transformers would build its own cache for it."""
    settings = generation.get("generation_config") or generation_config
    implementation = generation.pop("cache_implementation", None) or settings.cache_implementation
    if implementation is None:
        return PmodCache(config=config)
    if settings.cache_implementation is not None:  # transformers refuses a cache next to a cache implementation
        settings = copy.deepcopy(settings)
        settings.cache_implementation = None
        generation["generation_config"] = settings
    if implementation != "static":
        raise ValueError(f"cache_implementation={implementation!r}: a p-MoD model generates with its own dynamic "
                         "cache (the default) or 'static'")
    max_new_tokens = generation.get("max_new_tokens", settings.max_new_tokens)
    if max_new_tokens is None:
        raise ValueError("cache_implementation='static' needs max_new_tokens: the cache is sized for the prompt "
                         "plus the new tokens")
    return PmodStaticCache(config, max_cache_len=prompt_length + max_new_tokens)
