"""Model-level measurements, dense and p-MoD side by side: prefill, decode, training step, KV cache.

Every measurement returns a :class:`Row` holding both models' figures, their ratio and what
``pmod.accounting`` predicts for that ratio, so a table can put prediction and measurement side by side.
A pair (``benchmarks.models.ModelPair`` or ``benchmarks.hf_models.HfPair``) gives its inputs through
``pair.inputs(batch)``, whose ``model_kwargs(is_pmod)`` both models take; decode is the one part that differs:
our LLaVA class is stepped by hand (:func:`decode`), transformers' own classes run ``generate``
(:func:`generate_decode`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from transformers import StoppingCriteria
from transformers.cache_utils import DynamicCache

from benchmarks.models import ModelPair, pixel_inputs, reducer_of
from benchmarks.timing import measure, peak_memory_bytes, synchronize
from pmod.accounting import ModelShape, estimate
from pmod.cache import PmodCache
from pmod.hf_compat import cache_kwargs, output_cache, set_activation_checkpointing


@dataclass(frozen=True)
class Settings:
    warmup: int
    repeats: int
    decode_tokens: int
    decode_batches: tuple[int, ...]
    prefill_batch: int = 1
    train_batch: int = 1


@dataclass(frozen=True)
class Row:
    """One measurement of both models; ``predicted_ratio`` is from pmod.accounting (``predicted_kind`` says which)."""

    measurement: str
    batch: int
    unit: str
    dense: float | None
    pmod: float | None
    predicted_ratio: float | None
    predicted_kind: str

    @property
    def ratio(self) -> float | None:
        if self.dense in (None, 0) or self.pmod is None:
            return None
        return self.pmod / self.dense

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def _models(pair):
    return (("dense", pair.dense), ("pmod", pair.pmod))


def _accounting(pair, **kwargs):
    preset = pair.preset
    shape = ModelShape.from_config(pair.pmod.config)
    reducer = reducer_of(pair.pmod)
    schedule = None if reducer is not None else pair.schedule
    return estimate(shape, schedule, preset.n_text, preset.n_vision, reducer=reducer, **kwargs)


def prefill_llm(pair, settings: Settings) -> Row:
    """The prompt into the LLM (embeddings, or ids with image placeholders), logits of the last position only."""
    inputs = pair.inputs(settings.prefill_batch)
    times = {}
    for name, model in _models(pair):
        kwargs = inputs.model_kwargs(name == "pmod")

        def run(model=model, kwargs=kwargs):
            with torch.no_grad():
                model(**kwargs, use_cache=False, logits_to_keep=1)

        times[name] = measure(run, pair.device, settings.warmup, settings.repeats).median_s * 1e3
    predicted = _accounting(pair, lm_head_tokens=1).flops_ratio
    return Row("prefill, LLM only", settings.prefill_batch, "ms", times["dense"], times["pmod"], predicted, "FLOPs")


def prefill_full(pair: ModelPair, settings: Settings) -> Row:
    """Pixels and token ids through vision tower, projector, input preparation and LLM (last-position logits)."""
    inputs = pixel_inputs(pair, settings.prefill_batch)
    times = {}
    for name, model in _models(pair):

        def run(model=model):
            with torch.no_grad():
                model(**inputs.kwargs(), use_cache=False, logits_to_keep=1)

        times[name] = measure(run, pair.device, settings.warmup, settings.repeats).median_s * 1e3
    preset = pair.preset
    predicted = _accounting(pair, lm_head_tokens=1, include_vision_tower=True, n_tiles=preset.n_tiles,
                            vision=preset.tower.accounting_shape()).flops_ratio
    return Row("prefill, whole model (pixels)", settings.prefill_batch, "ms", times["dense"], times["pmod"],
               predicted, "FLOPs")


def new_cache(model, is_pmod: bool, preallocate: bool = True):
    """Both models' caches grow alike: preallocated buffers (a PmodCache without p-MoD layers for the dense
    model), or transformers' concatenation (``preallocate=False``, the ``cache`` part's reference)."""
    config = model.config.get_text_config()
    if is_pmod or preallocate:
        return PmodCache(config=config, preallocate=preallocate)
    return DynamicCache(config=config)


def prefill_with_cache(model, inputs, is_pmod: bool, preallocate: bool = True, cache=None):
    """The prefill a generation starts with, into ``cache`` (default: :func:`new_cache`); returns (cache, first
    new token [B, 1])."""
    cache = new_cache(model, is_pmod, preallocate) if cache is None else cache
    with torch.no_grad():
        out = model(**inputs.model_kwargs(is_pmod), **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)


def decode_steps(model, cache, token, attention_mask, steps: int) -> None:
    """Greedy decode; with a mask (uneven rows) it grows by one column per step, as in generate()."""
    with torch.no_grad():
        for _ in range(steps):
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], 1)
            out = model(input_ids=token, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)


def decode(pair: ModelPair, settings: Settings, batch: int, uneven: bool = False,
           preallocate: bool = True) -> list[Row]:
    """Greedy decode of ``decode_tokens`` tokens after an (untimed) prefill; per-token latency and tokens/s.

    ``uneven``: left-padded rows with different vision counts, so p-MoD layers keep different lengths per row
    and every decode step masks filler slots (batched evaluation's case). ``preallocate=False``: both models on
    transformers' concatenating cache layers.
    """
    inputs = pair.inputs(batch, uneven=uneven)
    per_token = {}
    for name, model in _models(pair):
        state = {}

        def setup(model=model, name=name, state=state):
            state["cache"], state["token"] = prefill_with_cache(model, inputs, name == "pmod", preallocate)

        def run(model=model, state=state):
            decode_steps(model, state["cache"], state["token"], inputs.attention_mask, settings.decode_tokens)

        timing = measure(run, pair.device, settings.warmup, settings.repeats, setup=setup)
        per_token[name] = timing.median_s / settings.decode_tokens
    return _decode_rows(pair, batch, uneven, per_token, preallocate)


class StepClock(StoppingCriteria):
    """Reads the clock (device synchronised) after every token ``generate`` makes; never stops it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_decode(pair, settings: Settings, batch: int, uneven: bool = False,
                    preallocate: bool = True) -> list[Row]:
    """Batched greedy ``generate`` on a fresh cache per run (:func:`new_cache`): per-token latency and tokens/s.

    Each run makes ``decode_tokens + 1`` tokens; the time from the first (the prefill's) to the last is the
    ``decode_tokens`` decode steps, with everything ``generate`` does around them.
    """
    inputs = pair.inputs(batch, uneven=uneven)
    per_token = {}
    for name, model in _models(pair):
        kwargs = inputs.model_kwargs(name == "pmod")
        samples = [_generated_seconds_per_token(model, kwargs, new_cache(model, name == "pmod", preallocate),
                                                pair.device, settings.decode_tokens)
                   for _ in range(settings.warmup + settings.repeats)]
        per_token[name] = statistics.median(samples[settings.warmup:])
    return _decode_rows(pair, batch, uneven, per_token, preallocate)


def _generated_seconds_per_token(model, kwargs: dict, cache, device: torch.device, steps: int) -> float:
    clock = StepClock(device)
    model.generate(**kwargs, **cache_kwargs(cache), max_new_tokens=steps + 1, do_sample=False,
                   stopping_criteria=[clock])
    return (clock.times[-1] - clock.times[0]) / steps


def _decode_rows(pair, batch: int, uneven: bool, per_token: dict, preallocate: bool = True) -> list[Row]:
    kv_ratio = _accounting(pair).kv_ratio
    label = ("decode, uneven rows" if uneven else "decode") + ("" if preallocate else ", concatenating cache")
    return [
        Row(f"{label}, latency per token", batch, "ms", per_token["dense"] * 1e3, per_token["pmod"] * 1e3, kv_ratio,
            "KV bytes"),
        Row(f"{label}, throughput", batch, "tokens/s", batch / per_token["dense"], batch / per_token["pmod"],
            1 / kv_ratio, "1 / KV bytes"),
    ]


def training_step(pair, settings: Settings) -> list[Row]:
    """Forward + backward with gradient checkpointing, loss on the text tokens; time and peak memory."""
    inputs = pair.inputs(settings.train_batch)
    times, peaks = {}, {}
    for name, model in _models(pair):
        kwargs = inputs.model_kwargs(name == "pmod")
        model.train()
        set_activation_checkpointing(model, True)

        def step(model=model, kwargs=kwargs):
            model.zero_grad(set_to_none=True)
            out = model(**kwargs, labels=inputs.labels, use_cache=False)
            out.loss.backward()

        try:
            times[name] = measure(step, pair.device, settings.warmup, settings.repeats).median_s * 1e3
            model.zero_grad(set_to_none=True)
            peaks[name] = peak_memory_bytes(step, pair.device)
        finally:
            model.zero_grad(set_to_none=True)
            set_activation_checkpointing(model, False)
            model.eval()
    predicted = _accounting(pair, lm_head_tokens=pair.preset.n_tokens).flops_ratio
    mib = {name: None if peak is None else peak / 2**20 for name, peak in peaks.items()}
    return [
        Row("training step (fwd+bwd, grad ckpt)", settings.train_batch, "ms", times["dense"], times["pmod"],
            predicted, "FLOPs"),
        Row("training step, peak memory", settings.train_batch, "MiB", mib["dense"], mib["pmod"], None, "-"),
    ]


def cache_bytes_per_layer(cache) -> list[int]:
    """Bytes of the key and value tensors each layer of a transformers cache holds."""
    return [layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in cache.layers]


def predicted_cache_bytes_per_layer(pair, is_pmod: bool) -> list[int]:
    report = _accounting(pair, kv_dtype=str(pair.dtype).removeprefix("torch."))
    return [layer.kv_bytes for layer in (report.layers if is_pmod else report.dense_layers)]


def kv_cache(pair) -> dict:
    """KV bytes of the cache a batch-1 prefill returns, per layer, beside pmod.accounting's prediction."""
    inputs = pair.inputs(1)
    result = {}
    for name, model in _models(pair):
        cache, _ = prefill_with_cache(model, inputs, name == "pmod")
        result[name] = {"measured": cache_bytes_per_layer(cache),
                        "predicted": predicted_cache_bytes_per_layer(pair, name == "pmod")}
    return result


def kv_rows(kv: dict) -> list[Row]:
    measured = {name: sum(v["measured"]) / 2**20 for name, v in kv.items()}
    predicted = {name: sum(v["predicted"]) / 2**20 for name, v in kv.items()}
    return [
        Row("KV cache after prefill, measured", 1, "MiB", measured["dense"], measured["pmod"],
            predicted["pmod"] / predicted["dense"], "KV bytes"),
        Row("KV cache after prefill, pmod.accounting", 1, "MiB", predicted["dense"], predicted["pmod"],
            predicted["pmod"] / predicted["dense"], "KV bytes"),
    ]
