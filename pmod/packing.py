"""Packed sequences: several samples in one ``[1, sum L, D]`` row, attended to one by one.

Two things are packed. With ``--packing`` a training batch is one row of its samples, each with its own
positions (no padding anywhere); and a p-MoD layer whose samples keep different numbers of tokens runs them
packed, whatever the input layout. Sample boundaries are host-known (lengths), so building them costs one
host-to-device copy and no synchronisation.

Attention keeps the samples apart through an attention function registered with transformers
(``AttentionInterface``): the layer's own ``self_attn`` runs unchanged and receives the boundaries as the
``pmod_packing`` keyword. The kernel is flash-attn's varlen function when installed (CUDA), torch's
``varlen_attn`` on CUDA, and otherwise one causal SDPA call per sample (any device). Without the keyword
the function is the implementation it wraps (``sdpa`` or ``flash_attention_2``), so a model switched to it
still runs padded batches.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from dataclasses import dataclass
from itertools import accumulate, pairwise

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PACKED_PREFIX = "pmod_packed_"
PACKABLE_IMPLEMENTATIONS = ("sdpa", "flash_attention_2")
PACKING_KWARG = "pmod_packing"


@dataclass(frozen=True)
class PackedSequences:
    """Lengths of the samples in a packed row: on the host for shapes, as ``cu_seqlens`` on the device."""

    lengths: tuple[int, ...]
    cu_seqlens: torch.Tensor  # [n + 1] int32: start of each sample, then the total

    @property
    def offsets(self) -> tuple[int, ...]:
        return (0, *accumulate(self.lengths))

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    def position_ids(self, device: torch.device) -> torch.Tensor:
        """[1, sum L]: each sample counts from 0."""
        return torch.cat([torch.arange(n) for n in self.lengths])[None].to(device, non_blocking=True)

    @classmethod
    def from_lengths(cls, lengths, device: torch.device) -> PackedSequences:
        lengths = tuple(int(n) for n in lengths)
        offsets = torch.tensor((0, *accumulate(lengths)), dtype=torch.int32)
        return cls(lengths, offsets.to(device, non_blocking=True))


def _per_sample_sdpa(query, key, value, sequences: PackedSequences, dropout: float, scaling):
    gqa = query.shape[1] != key.shape[1]
    pieces = [
        F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                       dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        for s, e in pairwise(sequences.offsets)
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2)


def _flash_attn_varlen(query, key, value, sequences: PackedSequences, dropout: float, scaling):
    from flash_attn import flash_attn_varlen_func

    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = flash_attn_varlen_func(q, k, v, sequences.cu_seqlens, sequences.cu_seqlens, sequences.max_length,
                                 sequences.max_length, dropout_p=dropout, softmax_scale=scaling, causal=True)
    return out[None]


def _torch_varlen(query, key, value, sequences: PackedSequences, dropout: float, scaling):
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    parameters = inspect.signature(varlen_attn).parameters
    extra = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in parameters:
            extra["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = varlen_attn(q, k, v, sequences.cu_seqlens, sequences.cu_seqlens, sequences.max_length,
                      sequences.max_length, scale=scaling, **extra)
    return out[None]


def _torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def packed_kernel_name(device: torch.device, dtype: torch.dtype, dropout: float = 0.0) -> str:
    """Which kernel attends a packed row on this device (reported by the benchmarks)."""
    if device.type != "cuda" or dtype == torch.float32:
        return "per-sample SDPA"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attn_varlen_func"
    if _torch_varlen_available() and dropout == 0.0:
        return "torch varlen_attn"
    return "per-sample SDPA"


KERNELS = {
    "per-sample SDPA": _per_sample_sdpa,
    "flash_attn_varlen_func": _flash_attn_varlen,
    "torch varlen_attn": _torch_varlen,
}


def packed_attention(query, key, value, sequences: PackedSequences, dropout: float = 0.0, scaling=None):
    """Causal attention within each sample of a packed ``[1, H, sum L, d]`` row; returns ``[1, sum L, H, d]``."""
    if query.shape[0] != 1:
        raise ValueError(f"a packed row has batch size 1, got {query.shape[0]}")
    if query.shape[2] != sequences.total:
        raise ValueError(f"the packed row holds {query.shape[2]} tokens but its samples add up to {sequences.total}")
    kernel = KERNELS[packed_kernel_name(query.device, query.dtype, dropout)]
    return kernel(query, key, value, sequences, dropout, scaling)


def _wrapping(base: str):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        sequences = kwargs.pop(PACKING_KWARG, None)
        if sequences is None:
            return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, dropout=dropout,
                                                 scaling=scaling, **kwargs)
        return packed_attention(query, key, value, sequences, dropout, scaling), None

    attention.__doc__ = f"{base} attention, or per-sample attention when given ``{PACKING_KWARG}``."
    return attention


def _packed_only(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The attention of a p-MoD layer's packed kept tokens (any base implementation)."""
    return packed_attention(query, key, value, kwargs[PACKING_KWARG], dropout, scaling), None


PACKED_ONLY = "pmod_packed"
AttentionInterface.register(PACKED_ONLY, _packed_only)
for _base in PACKABLE_IMPLEMENTATIONS:
    AttentionInterface.register(PACKED_PREFIX + _base, _wrapping(_base))
    AttentionMaskInterface.register(PACKED_PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS[_base])


def packed_implementation(config) -> str:
    """The packing-aware name of ``config``'s attention implementation (a clear error if none exists)."""
    current = config._attn_implementation or "sdpa"
    if current.startswith(PACKED_PREFIX):
        return current
    if current not in PACKABLE_IMPLEMENTATIONS:
        raise ValueError(
            f"packed sequences need attn_implementation {' or '.join(PACKABLE_IMPLEMENTATIONS)}, got {current!r}"
        )
    return PACKED_PREFIX + current


def enable_packed_attention(config) -> None:
    """Switch ``config``'s attention to its packing-aware version for good (padded batches run as before)."""
    config._attn_implementation = packed_implementation(config)


@contextlib.contextmanager
def packed_attention_for(config):
    """Packed attention for the duration of one call (a p-MoD layer's kept tokens, whatever the base)."""
    previous = config._attn_implementation
    config._attn_implementation = PACKED_ONLY
    try:
        yield
    finally:
        config._attn_implementation = previous


@dataclass(frozen=True)
class TokenRows:
    """Where each sample's tokens lie in the flattened hidden states ``[T, D]``, and the ``[B, W]`` row view
    (per-sample top-k, softmax norms) of per-token values.

    A padded input is its own row view (``T = B * W``). A packed input (``T = sum L``) is read into rows with
    ``unpack_index`` (slots past a sample's length repeat its first token and are masked by ``valid``) and
    written back with ``pack_index``.
    """

    row_offsets: torch.Tensor  # [B] flat index of each sample's first token
    width: int
    valid: torch.Tensor | None = None  # [B, W] bool, packed input only
    unpack_index: torch.Tensor | None = None  # [B, W] long, packed input only
    pack_index: torch.Tensor | None = None  # [T] long, packed input only

    @classmethod
    def padded(cls, batch: int, width: int, device: torch.device) -> TokenRows:
        return cls(torch.arange(batch, device=device) * width, width)

    @classmethod
    def packed(cls, sequences: PackedSequences, device: torch.device) -> TokenRows:
        """Row maps of a packed input, with one host-to-device copy."""
        lengths, width = sequences.lengths, sequences.max_length
        starts = torch.tensor(sequences.offsets[:-1])
        positions = torch.arange(width)
        real = positions[None] < torch.tensor(lengths)[:, None]
        unpack = torch.where(real, starts[:, None] + positions[None], starts[:, None])
        pack = torch.cat([torch.arange(n) + row * width for row, n in enumerate(lengths)])
        parts = (unpack.flatten(), pack, starts, real.flatten().long())
        on_device = torch.cat(parts).to(device, non_blocking=True).split([p.numel() for p in parts])
        return cls(on_device[2], width, on_device[3].view(len(lengths), width).bool(),
                   on_device[0].view(len(lengths), width), on_device[1])

    def to_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """[T] → [B, W]."""
        if self.unpack_index is None:
            return flat.reshape(-1, self.width)
        return flat[self.unpack_index]

    def to_flat(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, W] → [T]."""
        flat = rows.reshape(-1)
        return flat if self.pack_index is None else flat[self.pack_index]


def check_packed_attention(config) -> None:
    """A packed input needs the packing-aware attention in every layer: stock attention would let samples see
    each other without an error, so this is checked before the forward."""
    if not (config._attn_implementation or "").startswith(PACKED_PREFIX):
        raise ValueError(
            "a packed input needs the packing-aware attention: call pmod.packing.enable_packed_attention(config) "
            "(training does it with --packing True)"
        )
