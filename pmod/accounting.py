"""Analytic FLOPs and KV-cache size of one prefill forward pass, dense or p-MoD.

Conventions (see ``docs`` for the comparison with the paper):

* 1 multiply-add = 2 FLOPs. Only matrix multiplications are counted: q/k/v/o projections (grouped-query
  attention: k and v project to ``num_kv_heads * head_dim``), the gated MLP (gate, up, down), the attention
  score and value products, the p-MoD router (Linear(hidden, 1) over every token of the layer input), and
  optionally the LM head, the vision tower and the projector. Norms, activations, softmax, RoPE and
  element-wise updates are not counted (well under 1% for a 7B model).
* Attention is causal: only the query/key pairs of the causal triangle are counted, t(t+1)/2 pairs for t
  tokens (what FlashAttention computes; a kernel that masks a full square does twice the work).
* A dense layer processes every token; a p-MoD layer processes all text tokens plus
  ``schedule.keep_count(layer, n_vision)`` vision tokens (the official float32 rule) and caches K/V of exactly
  those tokens. Batch size 1, prefill only, no padding.
* The vision tower is CLIP ViT-L/14-336 (24 layers, hidden 1024, MLP 4096, 577 tokens per 336x336 tile,
  non-causal attention, patch embedding as a matmul); LLaVA takes layer -2 but the whole tower runs. The
  projector is ``mlp2x_gelu`` (1024 -> hidden -> hidden) over the 576 patch tokens of every tile.

* A training-free reducer (``pmod.reducers``: FastV, PyramidDrop, random, uniform) is costed the same way from
  its per-layer keep counts, with no router; FastV and PyramidDrop add their score row at each scoring layer
  (a key projection over the layer's whole input, one query projection and one row of scores), which is what
  our implementation computes. ``Report.mean_vision_tokens`` is the field's layer-averaged token count T_avg.

Command line: ``python -m pmod.accounting --preset llava-next-7b --beta 0.5``,
``python -m pmod.accounting --preset llava-1.5-7b --reducer fastv_k2_keep0.25``,
``python -m pmod.accounting --preset llava-1.5-7b --reducer pdrop --budget 128`` (the setting that meets it) or
``python -m pmod.accounting --config path/to/config.json --n-vision N --n-text T``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from pmod.reducers import ReducerSpec, for_budget, parse_reducer
from pmod.schedule import RetentionSchedule, parse_schedule, schedule_from_config

DEFAULT_SCHEDULE = "shiftedcos_decay_0.85_0.15"
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8": 1}
CLIP_PATCH_TOKENS = 576


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that decide its FLOPs and KV cache."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelShape.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers LlamaConfig-like object or dict (its ``text_config`` if it has one)."""
        config = _as_namespace(config)
        text = getattr(config, "text_config", None) or config
        text = _as_namespace(text)
        heads = text.num_attention_heads
        return cls(
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            vocab_size=text.vocab_size,
            head_dim=getattr(text, "head_dim", None),
        )


@dataclass(frozen=True)
class VisionTowerShape:
    """A ViT vision tower and the LLaVA ``mlp2x_gelu`` projector after it."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    tokens_per_tile: int = 577
    patch_size: int = 14
    channels: int = 3


CLIP_VIT_L_14_336 = VisionTowerShape()


@dataclass(frozen=True)
class LayerCost:
    """What one decoder layer processes and costs in a prefill."""

    layer: int
    is_mod: bool
    vision_tokens: int
    tokens: int
    linear_flops: int
    attention_flops: int
    router_flops: int
    kv_bytes: int
    score_flops: int = 0  # a reducer's attention-score row computed at this layer

    @property
    def flops(self) -> int:
        return self.linear_flops + self.attention_flops + self.router_flops + self.score_flops


@dataclass(frozen=True)
class Report:
    """Per-layer and total costs of one forward pass, beside the dense model on the same input."""

    n_text: int
    n_vision: int
    layers: tuple[LayerCost, ...]
    dense_layers: tuple[LayerCost, ...]
    lm_head_flops: int
    vision_tower_flops: int
    projector_flops: int

    @property
    def llm_flops(self) -> int:
        return sum(layer.flops for layer in self.layers) + self.lm_head_flops

    @property
    def total_flops(self) -> int:
        return self.llm_flops + self.vision_tower_flops + self.projector_flops

    @property
    def dense_total_flops(self) -> int:
        dense_llm = sum(layer.flops for layer in self.dense_layers) + self.lm_head_flops
        return dense_llm + self.vision_tower_flops + self.projector_flops

    @property
    def flops_ratio(self) -> float:
        return self.total_flops / self.dense_total_flops

    @property
    def kv_bytes(self) -> int:
        return sum(layer.kv_bytes for layer in self.layers)

    @property
    def dense_kv_bytes(self) -> int:
        return sum(layer.kv_bytes for layer in self.dense_layers)

    @property
    def kv_ratio(self) -> float:
        """KV cache of all tokens (text included) relative to the dense model."""
        return self.kv_bytes / self.dense_kv_bytes

    @property
    def vision_kv_ratio(self) -> float:
        """Share of the vision tokens' KV cache kept: the paper's "KV cache storage" (text ignored)."""
        if self.n_vision == 0:
            return 1.0
        return sum(layer.vision_tokens for layer in self.layers) / (self.n_vision * len(self.layers))

    @property
    def mean_vision_tokens(self) -> float:
        """T_avg: vision tokens per layer averaged over the decoder layers (SparseVLM / VisionZip convention)."""
        return sum(layer.vision_tokens for layer in self.layers) / len(self.layers)

    def table(self) -> str:
        """Per-layer tokens, GFLOPs and KV MiB, then totals."""
        lines = [f"{'layer':>5} {'kind':<5} {'vision':>7} {'tokens':>7} {'GFLOPs':>9} {'KV MiB':>8}"]
        for cost in self.layers:
            lines.append(
                f"{cost.layer:>5} {'p-MoD' if cost.is_mod else 'dense':<5} {cost.vision_tokens:>7} {cost.tokens:>7} "
                f"{cost.flops / 1e9:>9.2f} {cost.kv_bytes / 2**20:>8.2f}"
            )
        lines.append(
            f"total {self.total_flops / 1e12:.2f} TFLOPs (dense {self.dense_total_flops / 1e12:.2f}, "
            f"ratio {self.flops_ratio:.3f}); KV {self.kv_bytes / 2**20:.1f} MiB (ratio {self.kv_ratio:.3f}, "
            f"vision tokens {self.vision_kv_ratio:.4f})"
        )
        return "\n".join(lines)


def linear_flops(shape: ModelShape, tokens: int) -> int:
    """Projections and gated MLP of one decoder layer for ``tokens`` tokens."""
    q_dim = shape.num_heads * shape.head_dim
    kv_dim = shape.num_kv_heads * shape.head_dim
    weights = shape.hidden_size * (2 * q_dim + 2 * kv_dim) + 3 * shape.hidden_size * shape.intermediate_size
    return 2 * tokens * weights


def attention_flops(shape: ModelShape, tokens: int, causal: bool = True) -> int:
    """Score (QK^T) and value (AV) products of one decoder layer; causal counts only the triangle."""
    pairs = tokens * (tokens + 1) // 2 if causal else tokens * tokens
    return 2 * 2 * shape.num_heads * shape.head_dim * pairs


def vision_tower_flops(vision: VisionTowerShape, n_tiles: int) -> int:
    """The whole ViT (patch embedding, every layer, non-causal attention) over ``n_tiles`` tiles."""
    t, h = vision.tokens_per_tile, vision.hidden_size
    patch_embedding = 2 * (t - 1) * vision.channels * vision.patch_size**2 * h
    layer = 2 * t * (4 * h * h + 2 * h * vision.intermediate_size) + 2 * 2 * t * t * h
    return n_tiles * (patch_embedding + vision.num_layers * layer)


def projector_flops(vision: VisionTowerShape, llm_hidden: int, n_tokens: int) -> int:
    """``mlp2x_gelu``: Linear(vision hidden, LLM hidden), GELU, Linear(LLM hidden, LLM hidden)."""
    return 2 * n_tokens * (vision.hidden_size * llm_hidden + llm_hidden * llm_hidden)


def estimate(
    shape: ModelShape,
    schedule: RetentionSchedule | None,
    n_text: int,
    n_vision: int,
    include_vision_tower: bool = False,
    *,
    n_tiles: int | None = None,
    vision: VisionTowerShape = CLIP_VIT_L_14_336,
    lm_head_tokens: int = 0,
    kv_dtype: str = "float16",
    reducer: ReducerSpec | None = None,
) -> Report:
    """Costs of a batch-1 prefill with ``n_text`` text and ``n_vision`` vision tokens (schedule None = dense).

    ``n_tiles`` (vision tower and projector only) defaults to ``max(1, n_vision // 576)``, which is right for
    LLaVA-1.5 (1 tile) and for LLaVA-NeXT without unpadding (2880 tokens = 5 tiles); pass it for other layouts.
    ``lm_head_tokens`` is the number of positions whose logits are computed (0 to leave the head out; 1 for
    generation, which needs only the last position). ``reducer`` (instead of a schedule) costs a training-free
    reducer on the same dense model.
    """
    if reducer is not None:
        if schedule is not None:
            raise ValueError("give a p-MoD schedule or a reducer, not both")
        schedule = reducer.schedule(shape.num_layers)
    merged = reducer is not None and reducer.merges_before_llm  # VisionZip: D + C tokens per tile reach the LLM
    llm_vision = n_vision
    if merged:
        llm_vision = min(n_vision, reducer.tokens_per_image * (n_tiles or max(1, n_vision // CLIP_PATCH_TOKENS)))
    if n_text < 0 or n_vision < 0 or n_text + n_vision == 0:
        raise ValueError(f"need n_text >= 0, n_vision >= 0 and at least one token, got {n_text}, {n_vision}")
    if kv_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    if schedule is not None and schedule.num_layers != shape.num_layers:
        raise ValueError(
            f"the schedule has {schedule.num_layers} layers but the model has {shape.num_layers}"
        )
    bytes_per_value = DTYPE_BYTES[kv_dtype]
    layers = _layer_costs(shape, schedule, n_text, llm_vision, bytes_per_value, reducer)
    dense_layers = _layer_costs(shape, None, n_text, n_vision, bytes_per_value)
    tower = projector = 0
    if include_vision_tower and n_vision:
        tiles = n_tiles if n_tiles is not None else max(1, n_vision // CLIP_PATCH_TOKENS)
        tower = vision_tower_flops(vision, tiles)
        projected = llm_vision if merged else tiles * (vision.tokens_per_tile - 1)
        projector = projector_flops(vision, shape.hidden_size, projected)
    return Report(
        n_text=n_text,
        n_vision=n_vision,
        layers=layers,
        dense_layers=dense_layers,
        lm_head_flops=2 * lm_head_tokens * shape.hidden_size * shape.vocab_size,
        vision_tower_flops=tower,
        projector_flops=projector,
    )


def score_row_flops(shape: ModelShape, tokens: int) -> int:
    """One query row's attention scores over ``tokens`` keys: key projection, one query projection, q.K^T."""
    q_dim = shape.num_heads * shape.head_dim
    kv_dim = shape.num_kv_heads * shape.head_dim
    return 2 * tokens * shape.hidden_size * kv_dim + 2 * shape.hidden_size * q_dim + 2 * q_dim * tokens


def _layer_costs(shape, schedule, n_text, n_vision, bytes_per_value, reducer=None) -> tuple[LayerCost, ...]:
    score_layers = set()
    if reducer is not None and reducer.uses_attention:
        score_layers = {drop + reducer.score_layer_offset for drop in reducer.drop_layers}
    costs = []
    for layer in range(shape.num_layers):
        is_mod = schedule is not None and schedule.is_mod(layer)
        vision_tokens = schedule.keep_count(layer, n_vision) if is_mod else n_vision
        tokens = n_text + vision_tokens
        costs.append(
            LayerCost(
                layer=layer,
                is_mod=is_mod,
                vision_tokens=vision_tokens,
                tokens=tokens,
                linear_flops=linear_flops(shape, tokens),
                attention_flops=attention_flops(shape, tokens),
                router_flops=2 * shape.hidden_size * (n_text + n_vision) if is_mod and reducer is None else 0,
                kv_bytes=2 * tokens * shape.num_kv_heads * shape.head_dim * bytes_per_value,
                score_flops=score_row_flops(shape, n_text + n_vision) if layer in score_layers else 0,
            )
        )
    return tuple(costs)


VICUNA_7B = ModelShape(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
                       vocab_size=32000)


# Qwen2-7B / Qwen2.5-7B, the language model of Qwen2.5-VL-7B and LLaVA-OneVision-7B (grouped-query attention).
QWEN2_7B = ModelShape(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                      vocab_size=152064)


@dataclass(frozen=True)
class Preset:
    """A released model, the input we assume for it, and the paper's figures (Tables 1 and 3) where it has them."""

    shape: ModelShape
    n_vision: int
    n_text: int
    n_tiles: int
    paper_dense_tflops: float | None = None
    paper_pmod_tflops: Mapping[float, float] = field(default_factory=dict)
    paper_kv: Mapping[float, float] = field(default_factory=dict)
    clip_tower: bool = False  # the vision tower is CLIP ViT-L/14-336 (what --include-vision-tower models)


# n_text = 64: a vicuna_v1 prompt (system message ~35 tokens, role tags, "<image>\n" and a short question).
# Qwen2.5-VL-7B: one 896 x 896 image, 64 x 64 patches of 14 px merged 2 x 2 = 1024 visual tokens.
# LLaVA-OneVision-7B: one 768 x 768 image, SigLIP-384 base 27 x 27 = 729 tokens plus a 2 x 2 tile grid of
# 54 x 54 with one newline per row = 2970: 3699 visual tokens (below anyres_max_9's downsampling threshold).
PRESETS = {
    "llava-1.5-7b": Preset(VICUNA_7B, n_vision=576, n_text=64, n_tiles=1, paper_dense_tflops=8.38,
                           paper_pmod_tflops={0.5: 4.92}, paper_kv={0.5: 0.538}, clip_tower=True),
    "llava-next-7b": Preset(VICUNA_7B, n_vision=2880, n_text=64, n_tiles=5, paper_dense_tflops=39.46,
                            paper_pmod_tflops={0.5: 21.94, 0.4: 19.56, 0.3: 17.78},
                            paper_kv={0.5: 0.538, 0.4: 0.475, 0.3: 0.423}, clip_tower=True),
    "qwen2.5-vl-7b": Preset(QWEN2_7B, n_vision=1024, n_text=64, n_tiles=1),
    "llava-onevision-7b": Preset(QWEN2_7B, n_vision=3699, n_text=64, n_tiles=5),
}


def _as_namespace(config):
    return SimpleNamespace(**config) if isinstance(config, Mapping) else config


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m pmod.accounting", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS))
    source.add_argument("--config", type=Path, help="a model config.json (dense LLaVA or p-MoD)")
    parser.add_argument("--beta", type=float, help="--mod_router_factor (default: the config's, or 0.5)")
    parser.add_argument("--schedule", help=f"--mod_target_layers (default: the config's, or {DEFAULT_SCHEDULE})")
    parser.add_argument("--reducer", help="a training-free reducer on the dense model instead of p-MoD, e.g. "
                                          "fastv_k2_keep0.25 (see pmod.reducers), or a family with --budget")
    parser.add_argument("--budget", type=float,
                        help="with --reducer FAMILY (fastv, fastv_k3, pdrop, visionzip, ...): the layer-averaged "
                             "vision tokens to meet (e.g. 192), or a share of them if <= 1")
    parser.add_argument("--n-vision", type=int, help="vision tokens (MoD targets)")
    parser.add_argument("--n-text", type=int, help="text tokens")
    parser.add_argument("--n-tiles", type=int, help="vision-tower tiles (default: n_vision // 576)")
    parser.add_argument("--include-vision-tower", action="store_true", help="add CLIP ViT-L/14-336 and projector")
    parser.add_argument("--lm-head-tokens", type=int, default=0, help="positions whose logits are computed")
    parser.add_argument("--kv-dtype", default="float16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--per-layer", action="store_true", help="print the per-layer table")
    return parser.parse_args(argv)


def _schedule_for(args, config, shape: ModelShape) -> tuple[RetentionSchedule | None, float | None]:
    num_layers = shape.num_layers
    if config is not None and args.beta is None and args.schedule is None:
        schedule = schedule_from_config(_as_namespace(config))
        return schedule, getattr(_as_namespace(config), "mod_router_factor", None) if schedule else None
    spec = args.schedule or (config or {}).get("mod_target_layers") or DEFAULT_SCHEDULE
    beta = args.beta if args.beta is not None else (config or {}).get("mod_router_factor", 0.5)
    return parse_schedule(spec, beta, num_layers), beta


def main(argv=None) -> int:
    args = _parse_args(argv)
    config = json.loads(args.config.read_text()) if args.config else None
    preset = PRESETS.get(args.preset)
    shape = preset.shape if preset else ModelShape.from_config(config)
    n_vision = args.n_vision if args.n_vision is not None else (preset.n_vision if preset else None)
    n_text = args.n_text if args.n_text is not None else (preset.n_text if preset else None)
    if n_vision is None or n_text is None:
        raise SystemExit("--n-vision and --n-text are required with --config")
    n_tiles = args.n_tiles if args.n_tiles is not None else (preset.n_tiles if preset else None)
    if args.include_vision_tower and preset is not None and not preset.clip_tower:
        raise SystemExit(f"--include-vision-tower models CLIP ViT-L/14-336 only; {args.preset} has another tower "
                         "(its LLM figures are exact)")
    reducer = None
    if args.budget is not None and not args.reducer:
        raise SystemExit("--budget needs --reducer FAMILY (e.g. --reducer fastv --budget 192)")
    if args.reducer:
        if args.beta is not None or args.schedule is not None:
            raise SystemExit("--reducer costs the dense model with a reducer: leave out --beta and --schedule")
        try:
            if args.budget is None:
                reducer = parse_reducer(args.reducer)
            else:
                share = args.budget if args.budget <= 1 else args.budget / n_vision
                reducer = for_budget(args.reducer, share, n_vision, shape.num_layers)
        except ValueError as error:
            raise SystemExit(f"--reducer: {error}") from None
        schedule, beta = None, None
    else:
        schedule, beta = _schedule_for(args, config, shape)
    report = estimate(shape, schedule, n_text, n_vision, args.include_vision_tower, n_tiles=n_tiles,
                      lm_head_tokens=args.lm_head_tokens, kv_dtype=args.kv_dtype, reducer=reducer)
    print(_summary(report, preset, beta, args, reducer))
    if args.per_layer:
        print(report.table())
    return 0


def _summary(report: Report, preset: Preset | None, beta: float | None, args, reducer=None) -> str:
    paper_dense = paper_pmod = paper_kv = None
    method = reducer.name if reducer is not None else "p-MoD"
    if preset is not None and not args.include_vision_tower and args.lm_head_tokens == 0 and reducer is None:
        paper_dense, paper_pmod, paper_kv = (
            preset.paper_dense_tflops, preset.paper_pmod_tflops.get(beta), preset.paper_kv.get(beta)
        )

    def paper(value, fmt):
        return format(value, fmt) if value is not None else "-"

    paper_ratio = paper_pmod / paper_dense if paper_pmod is not None else None
    what = f"{report.n_text} text + {report.n_vision} vision tokens"
    lines = [
        f"{args.preset or args.config}: {what}, {method if reducer else f'beta {beta}'}, KV in {args.kv_dtype}",
        f"{'':<26}{'ours':>10}{'paper':>10}",
        f"{'dense TFLOPs':<26}{report.dense_total_flops / 1e12:>10.2f}{paper(paper_dense, '.2f'):>10}",
        f"{'reduced TFLOPs' if reducer else 'p-MoD TFLOPs':<26}{report.total_flops / 1e12:>10.2f}"
        f"{paper(paper_pmod, '.2f'):>10}",
        f"{'reduced / dense FLOPs' if reducer else 'p-MoD / dense FLOPs':<26}{report.flops_ratio:>10.3f}"
        f"{paper(paper_ratio, '.3f'):>10}",
        f"{'KV cache, vision tokens':<26}{report.vision_kv_ratio:>10.4f}{paper(paper_kv, '.3f'):>10}",
        f"{'KV cache, all tokens':<26}{report.kv_ratio:>10.4f}{'-':>10}",
        f"{'vision tokens, layer mean':<26}{report.mean_vision_tokens:>10.1f}{'-':>10}",
        f"KV cache {report.kv_bytes / 2**20:.1f} MiB (dense {report.dense_kv_bytes / 2**20:.1f} MiB)",
    ]
    if preset is not None and paper_dense is None and reducer is None:
        lines.append("paper figures are shown only for their convention: LLM prefill, no LM head, no vision tower")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
