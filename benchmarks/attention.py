"""Padded vs packed layout for a p-MoD layer's kept tokens, on one stock decoder layer, batch 8, uneven lengths.

A right-padded ``[B, Lk_max, D]`` batch with causal SDPA (what p-MoD layers did before ``pmod.packing``) pays
for the padding in projections, MLP and attention. A packed ``[1, sum Lk, D]`` layout (what they do now with
uneven rows) pays only for real tokens but needs attention that keeps samples apart.
The stock layer's ``self_attn`` is reused unchanged; only its attention function is swapped (transformers'
``AttentionInterface``) for:

* ``packed, per-sample SDPA``: one causal SDPA call per sample on host-known offsets (any device);
* ``packed, varlen_attn``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention/cuDNN; CUDA only);
* ``packed, flex_attention``: a compiled ``flex_attention`` with a document-causal ``BlockMask`` (CUDA only;
  the block mask differs per layer, so its build time is reported separately).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from itertools import pairwise

import torch
from transformers import AttentionInterface

from benchmarks.models import ModelPair
from benchmarks.timing import measure
from pmod.accounting import ModelShape, attention_flops, linear_flops
from pmod.packing import KERNELS, PackedSequences

logger = logging.getLogger(__name__)

SPREAD = (0.6, 1.0)  # LLaVA-NeXT images give ~1.7k-2.9k vision tokens: 0.6x to 1.0x of the 2880 maximum
KEEP_RATIO = 0.5


@dataclass(frozen=True)
class AttentionRow:
    layout: str
    tokens_computed: int
    ms: float | None
    ratio_to_padded: float | None
    predicted_ratio: float  # FLOPs of this layout / FLOPs of the padded layout
    max_abs_diff: float | None  # against the padded layout on real tokens
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def uneven_kept_lengths(n_text: int, n_vision: int, batch: int) -> list[int]:
    """Kept lengths of a batch whose images give SPREAD x n_vision tokens, each keeping KEEP_RATIO of them."""
    low, high = SPREAD
    fractions = [low + (high - low) * i / max(batch - 1, 1) for i in range(batch)]
    return [n_text + int(int(n_vision * f) * KEEP_RATIO) for f in fractions]


def _kernel(name: str):
    """pmod.packing's kernel ``name`` as an attention function (the benchmark picks the kernel itself)."""
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, pack_sequences, **_):
        return KERNELS[name](query, key, value, pack_sequences, 0.0, scaling), None

    return attention


def _packed_flex(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *, pack_block_mask,
                 pack_flex, **_):
    out = pack_flex(query, key, value, block_mask=pack_block_mask, scale=scaling,
                    enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2), None


ATTENTION_FUNCTIONS = {
    "pmod_bench_packed_sdpa": _kernel("per-sample SDPA"),
    "pmod_bench_packed_varlen": _kernel("torch varlen_attn"),
    "pmod_bench_packed_flex": _packed_flex,
}
for _name, _function in ATTENTION_FUNCTIONS.items():
    AttentionInterface.register(_name, _function)


@contextlib.contextmanager
def attention_function(layer, name: str):
    config = layer.self_attn.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def compare_layouts(pair: ModelPair, warmup: int, repeats: int, batch: int = 8) -> list[AttentionRow]:
    preset, device, dtype = pair.preset, pair.device, pair.dtype
    llm = pair.pmod.get_model()
    layer = llm.layers[llm.schedule.mod_layers[0]].decoder_layer
    lengths = uneven_kept_lengths(preset.n_text, preset.n_vision, batch)
    width, total = max(lengths), sum(lengths)
    hidden_size = preset.llm.hidden_size
    generator = torch.Generator().manual_seed(0)
    padded = (torch.randn(batch, width, hidden_size, generator=generator) * 0.02).to(device, dtype)
    padded_rope = llm.rotary_emb(padded, position_ids=torch.arange(width, device=device)[None])
    packed = torch.cat([padded[b, :n] for b, n in enumerate(lengths)])[None]
    sequences = PackedSequences.from_lengths(lengths, device)
    packed_rope = llm.rotary_emb(packed, position_ids=sequences.position_ids(device))
    offsets = sequences.offsets

    shape = ModelShape.from_config(pair.pmod.config)
    padded_flops = batch * (linear_flops(shape, width) + attention_flops(shape, width))
    packed_flops = sum(linear_flops(shape, n) + attention_flops(shape, n) for n in lengths)

    rows = []
    with torch.no_grad():
        reference = layer(padded, position_embeddings=padded_rope)
        reference_packed = torch.cat([reference[b, :n] for b, n in enumerate(lengths)])
        padded_ms = measure(lambda: layer(padded, position_embeddings=padded_rope), device, warmup,
                            repeats).median_s * 1e3
        rows.append(AttentionRow("padded [B, Lk_max, D], causal SDPA (model today)", batch * width, padded_ms, 1.0,
                                 1.0, 0.0))

        def run_packed(name, **kwargs):
            with attention_function(layer, name):
                out = layer(packed, position_embeddings=packed_rope, **kwargs)
                diff = (out[0] - reference_packed).abs().max().item()
                ms = measure(lambda: layer(packed, position_embeddings=packed_rope, **kwargs), device, warmup,
                             repeats).median_s * 1e3
            return ms, diff

        def add(label, name, note="", **kwargs):
            try:
                ms, diff = run_packed(name, **kwargs)
                rows.append(AttentionRow(label, total, ms, ms / padded_ms, packed_flops / padded_flops, diff, note))
            except Exception as error:  # noqa: BLE001 - an unavailable kernel is a result to report, not a crash
                logger.warning("%s failed: %s", label, error)
                rows.append(AttentionRow(label, total, None, None, packed_flops / padded_flops, None,
                                         f"failed: {type(error).__name__}: {str(error)[:120]}"))

        add("packed [1, sum Lk, D], per-sample SDPA", "pmod_bench_packed_sdpa", pack_sequences=sequences)
        if device.type != "cuda":
            for label in ("packed, varlen_attn", "packed, flex_attention"):
                rows.append(AttentionRow(label, total, None, None, packed_flops / padded_flops, None, "CUDA only"))
            return rows
        add("packed, varlen_attn", "pmod_bench_packed_varlen", pack_sequences=sequences)
        _add_flex(rows, add, offsets, device, warmup, repeats)
    return rows


def _add_flex(rows, add, offsets, device, warmup, repeats) -> None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        rows.append(AttentionRow("packed, flex_attention", offsets[-1], None, None, float("nan"), None, str(error)))
        return
    total = offsets[-1]
    document = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=device),
                                       torch.tensor([e - s for s, e in pairwise(offsets)], device=device))

    def document_causal(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    def build():
        return create_block_mask(document_causal, None, None, total, total, device=device)

    mask_ms = measure(build, device, warmup, repeats).median_s * 1e3
    add("packed, flex_attention", "pmod_bench_packed_flex", note=f"+{mask_ms:.3f} ms BlockMask build per layer",
        pack_block_mask=build(), pack_flex=torch.compile(flex_attention))
