"""Turning lmms-eval generation kwargs into `generate()` arguments, and applying stop strings.

lmms-eval hands every task's `generation_kwargs` to the model unfiltered: besides the Hugging Face
arguments they carry `until` (stop strings the model must apply itself) and task hints such as
`image_aspect_ratio`. Those must never reach `generate()`, and greedy decoding must not receive
sampling arguments (transformers warns and some versions refuse).
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 1024
"""What the paper's evaluation used when a task sets none (lmms-eval's llava adapter default)."""

_PASSED_THROUGH = ("max_new_tokens", "min_new_tokens", "num_beams", "repetition_penalty", "length_penalty",
                   "no_repeat_ngram_size")
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")
_KNOWN_IGNORED = ("until", "image_aspect_ratio", "do_sample")


@dataclass
class GenerationPlan:
    """What one batch of requests needs: the `generate()` kwargs and the stop strings to apply."""

    generate_kwargs: Dict[str, Any]
    stop_strings: List[str] = field(default_factory=list)


def _as_stop_list(until: Any) -> List[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(item, str) for item in until):
        return list(until)
    raise ValueError(f"generation kwarg `until` must be a string or a list of strings, got {until!r}")


def plan_generation(gen_kwargs: Mapping[str, Any]) -> GenerationPlan:
    """Split lmms-eval kwargs into `generate()` kwargs (greedy unless temperature > 0) and stop strings."""
    stop_strings = [stop for stop in _as_stop_list(gen_kwargs.get("until")) if stop]
    temperature = float(gen_kwargs.get("temperature", 0) or 0)
    do_sample = temperature > 0
    kwargs: Dict[str, Any] = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "num_beams": 1, "do_sample": do_sample}
    for key, value in gen_kwargs.items():
        if key in _PASSED_THROUGH and value is not None:
            kwargs[key] = int(value) if key in ("max_new_tokens", "min_new_tokens", "num_beams") else value
        elif key in _SAMPLING_ONLY:
            if do_sample and value is not None:
                kwargs[key] = value
        elif key not in _KNOWN_IGNORED:
            logger.debug("Ignoring generation kwarg %s=%r (not a generate() argument)", key, value)
    if gen_kwargs.get("image_aspect_ratio") is not None:
        logger.debug("Task asks for image_aspect_ratio=%s; the checkpoint's own setting is used",
                     gen_kwargs["image_aspect_ratio"])
    return GenerationPlan(generate_kwargs=kwargs, stop_strings=stop_strings)


def truncate_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Cut `text` before the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        position = text.find(stop)
        if 0 <= position < cut:
            cut = position
    return text[:cut]
