"""Decode through ``generate``: the dynamic cache run eagerly vs a static cache with compiled decode steps.

Both models decode the same prompts. Eager, each uses the cache it uses today (p-MoD: ``PmodCache``, dense:
the same class without compact layers). Compiled, each uses a fixed-capacity cache (p-MoD: ``PmodStaticCache``,
dense: transformers' ``StaticCache``, the caches ``cache_implementation="static"`` builds) and transformers compiles the
decode step (``compile_config``; CUDA graphs with ``mode="reduce-overhead"`` on a GPU). The first run of each
(warm-up) compiles; timed runs reuse the compiled step.
"""

from __future__ import annotations

import statistics

import torch
from transformers import CompileConfig, GenerationMixin, StaticCache

from benchmarks.suite import Row, Settings, StepClock, _accounting, _models, new_cache
from pmod.hf_compat import cache_kwargs
from pmod.static_cache import PmodStaticCache


def compile_config(device: torch.device, backend: str) -> CompileConfig:
    """CUDA graphs on a GPU (transformers' default mode); plain inductor elsewhere, where the mode means nothing."""
    config = CompileConfig(backend=backend, mode="reduce-overhead" if device.type == "cuda" else None)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return config


def static_cache(model, is_pmod: bool, capacity: int):
    config = model.config.get_text_config()
    return PmodStaticCache(config, max_cache_len=capacity) if is_pmod else StaticCache(config=config,
                                                                                       max_cache_len=capacity)


def seconds_per_token(model, kwargs: dict, device: torch.device, steps: int, **options) -> float:
    """One greedy ``generate`` of ``steps + 1`` tokens; the time from the first token (the prefill's) to the last.

    ``GenerationMixin.generate`` takes the prompt as embeddings (our LLaVA ``generate`` wants ids and pixels).
    """
    clock = StepClock(device)
    GenerationMixin.generate(model, **kwargs, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                             stopping_criteria=[clock], **options)
    return (clock.times[-1] - clock.times[0]) / steps


def static_decode(pair, settings: Settings, batch: int, backend: str = "inductor") -> list[Row]:
    """Per-token latency of both models, eager with the dynamic cache and compiled with a static one, on uneven
    left-padded rows when ``batch`` > 1 (p-MoD layers then keep different lengths per row)."""
    inputs = pair.inputs(batch, uneven=batch > 1)
    config = compile_config(pair.device, backend)
    eager, compiled = {}, {}
    for name, model in _models(pair):
        kwargs = inputs.model_kwargs(name == "pmod")
        if kwargs["attention_mask"] is None:
            kwargs["attention_mask"] = torch.ones(inputs.inputs_embeds.shape[:2], dtype=torch.long,
                                                  device=pair.device)
        runs = settings.warmup + settings.repeats
        eager[name] = statistics.median([
            seconds_per_token(model, kwargs, pair.device, settings.decode_tokens,
                              **cache_kwargs(new_cache(model, name == "pmod")))
            for _ in range(runs)][settings.warmup:])
        capacity = inputs.inputs_embeds.shape[1] + settings.decode_tokens + 1
        compiled[name] = statistics.median([
            seconds_per_token(model, kwargs, pair.device, settings.decode_tokens, compile_config=config,
                              **cache_kwargs(static_cache(model, name == "pmod", capacity)))
            for _ in range(max(runs, settings.repeats + 1))][-settings.repeats:])
        torch._dynamo.reset()  # the other model compiles its own step
    kv_ratio = _accounting(pair).kv_ratio
    label = "decode via generate" + (", uneven rows" if batch > 1 else "")
    return [
        Row(f"{label}, dynamic cache (eager), latency per token", batch, "ms", eager["dense"] * 1e3,
            eager["pmod"] * 1e3, kv_ratio, "KV bytes"),
        Row(f"{label}, static cache (compiled, {backend}), latency per token", batch, "ms",
            compiled["dense"] * 1e3, compiled["pmod"] * 1e3, kv_ratio, "KV bytes"),
        Row(f"{label}, static compiled throughput", batch, "tokens/s", batch / compiled["dense"],
            batch / compiled["pmod"], 1 / kv_ratio, "1 / KV bytes"),
    ]
