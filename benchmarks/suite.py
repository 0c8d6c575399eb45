"""Model-level measurements, dense and p-MoD side by side: prefill, decode, training step, KV cache.

Every measurement returns a :class:`Row` holding both models' figures, their ratio and what
``pmod.accounting`` predicts for that ratio, so a table can put prediction and measurement side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers.cache_utils import DynamicCache

from benchmarks.models import LlmInputs, ModelPair, llm_inputs, pixel_inputs
from benchmarks.timing import measure, peak_memory_bytes
from pmod.accounting import ModelShape, estimate
from pmod.cache import PmodCache
from pmod.hf_compat import output_cache, set_activation_checkpointing


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


def _models(pair: ModelPair):
    return (("dense", pair.dense), ("pmod", pair.pmod))


def _accounting(pair: ModelPair, **kwargs):
    preset = pair.preset
    schedule = pair.pmod.get_model().schedule
    return estimate(ModelShape.from_config(pair.pmod.config), schedule, preset.n_text, preset.n_vision, **kwargs)


def prefill_llm(pair: ModelPair, settings: Settings) -> Row:
    """inputs_embeds (+ mod_target_mask for p-MoD) into the LLM, logits of the last position only."""
    inputs = llm_inputs(pair, settings.prefill_batch)
    times = {}
    for name, model in _models(pair):
        routing = inputs.routing() if name == "pmod" else {}

        def run(model=model, routing=routing):
            with torch.no_grad():
                model(inputs_embeds=inputs.inputs_embeds, use_cache=False, logits_to_keep=1, **routing)

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


def new_cache(model, is_pmod: bool):
    return PmodCache(config=model.config) if is_pmod else DynamicCache(config=model.config)


def prefill_with_cache(model, inputs: LlmInputs, is_pmod: bool):
    """The prefill a generation starts with; returns (cache, first new token [B, 1])."""
    cache = new_cache(model, is_pmod)
    routing = inputs.routing() if is_pmod else {}
    with torch.no_grad():
        out = model(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **routing)
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


def decode(pair: ModelPair, settings: Settings, batch: int, uneven: bool = False) -> list[Row]:
    """Greedy decode of ``decode_tokens`` tokens after an (untimed) prefill; per-token latency and tokens/s.

    ``uneven``: left-padded rows with different vision counts, so p-MoD layers keep different lengths per row
    and every decode step masks filler slots (batched evaluation's case).
    """
    inputs = llm_inputs(pair, batch, uneven=uneven)
    per_token = {}
    for name, model in _models(pair):
        state = {}

        def setup(model=model, name=name, state=state):
            state["cache"], state["token"] = prefill_with_cache(model, inputs, name == "pmod")

        def run(model=model, state=state):
            decode_steps(model, state["cache"], state["token"], inputs.attention_mask, settings.decode_tokens)

        timing = measure(run, pair.device, settings.warmup, settings.repeats, setup=setup)
        per_token[name] = timing.median_s / settings.decode_tokens
    kv_ratio = _accounting(pair).kv_ratio
    label = "decode, uneven rows" if uneven else "decode"
    return [
        Row(f"{label}, latency per token", batch, "ms", per_token["dense"] * 1e3, per_token["pmod"] * 1e3, kv_ratio,
            "KV bytes"),
        Row(f"{label}, throughput", batch, "tokens/s", batch / per_token["dense"], batch / per_token["pmod"],
            1 / kv_ratio, "1 / KV bytes"),
    ]


def training_step(pair: ModelPair, settings: Settings) -> list[Row]:
    """Forward + backward with gradient checkpointing, loss on the text tokens; time and peak memory."""
    inputs = llm_inputs(pair, settings.train_batch)
    times, peaks = {}, {}
    for name, model in _models(pair):
        routing = inputs.routing() if name == "pmod" else {}
        model.train()
        set_activation_checkpointing(model, True)

        def step(model=model, routing=routing):
            model.zero_grad(set_to_none=True)
            out = model(inputs_embeds=inputs.inputs_embeds, labels=inputs.labels, use_cache=False, **routing)
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


def predicted_cache_bytes_per_layer(pair: ModelPair, is_pmod: bool) -> list[int]:
    report = _accounting(pair, kv_dtype=str(pair.dtype).removeprefix("torch."))
    return [layer.kv_bytes for layer in (report.layers if is_pmod else report.dense_layers)]


def kv_cache(pair: ModelPair) -> dict:
    """KV bytes of the cache a batch-1 prefill returns, per layer, beside pmod.accounting's prediction."""
    inputs = llm_inputs(pair, 1)
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
