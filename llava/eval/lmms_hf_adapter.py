"""lmms-eval model `pmod_hf`: transformers' own VLMs (LLaVA-HF, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL,
Qwen2.5-VL), dense or p-MoD (``pmod.hf``), through their own processor and chat template.

It answers the way `pmod_llava` does (``llava.eval.lmms_base``: batches with equal generation kwargs,
left padding, each request its own document, `until` stop strings, the log-probability for loglikelihood)
and writes the same per-sample efficiency records, with each p-MoD layer's kept vision tokens read from the
generation's cache.

The prompt is one user message: the task's images, then its text (an ``<image>`` tag in the text places an
image there instead), rendered by the checkpoint's chat template with the generation prompt.
"""

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.eval.efficiency import EfficiencyLog
from llava.eval.generation import plan_generation, truncate_at_stop_strings
from llava.eval.lmms_base import BatchedModel, continuation_logprob, parse_dtype
from llava.train.hf_data import content_parts
from pmod.cache import PmodCache
from pmod.hf import apply_reducer, load_vlm
from pmod.hf.families import base_architecture, visual_token_ids
from pmod.hf_compat import output_cache
from pmod.schedule import schedule_from_config

logger = logging.getLogger(__name__)
PIXEL_LIMITS = ("min_pixels", "max_pixels")  # Qwen-VL image processors: the image size range, in pixels


def kept_vision_from_cache(cache, num_layers: int, row: int, text_tokens: int, n_vision: int) -> List[int]:
    """Vision tokens each layer kept for ``row`` at prefill: a p-MoD layer's compact cache holds the row's text
    and kept vision tokens; dense layers keep every vision token."""
    kept = []
    for layer in range(num_layers):
        compact = cache.compact_layer(layer)
        kept.append(compact.pattern[row] - text_tokens if compact is not None else n_vision)
    return kept


class PmodHF(BatchedModel):
    """A transformers VLM checkpoint (dense, or p-MoD saved by ``pmod.hf``) behind lmms-eval's simple-model API.

    Model arguments (`--model_args k=v,...`): `pretrained` (checkpoint folder or hub id), `device`,
    `batch_size`, `attn_implementation` (default sdpa), `dtype` (auto, float16, bfloat16, float32),
    `min_pixels` / `max_pixels` (Qwen-VL image size range), `log_efficiency`, `efficiency_dir`,
    `device_map` (`auto` spreads the model over one process's GPUs), `use_cache` (must stay True), `reducer` (a
    training-free vision-token reducer for a dense checkpoint, e.g. `fastv_k2_keep0.25`; see `pmod.reducers`).
    For evaluation during training pass `model` and `processor` instead of `pretrained`. `max_batch_size` is
    accepted (lmms-eval passes it) and ignored.
    """

    model_id = "pmod_hf"

    def __init__(
        self,
        pretrained: Optional[str] = None,
        device: Optional[str] = None,
        batch_size: Any = 1,
        attn_implementation: Optional[str] = "sdpa",
        dtype: Any = None,
        min_pixels: Any = None,
        max_pixels: Any = None,
        log_efficiency: bool = False,
        efficiency_dir: Optional[str] = None,
        max_batch_size: Optional[int] = None,
        model: Optional[torch.nn.Module] = None,
        processor: Any = None,
        device_map: Optional[str] = None,
        use_cache: Any = True,
        reducer: Optional[str] = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        self._check_arguments(unknown, batch_size, use_cache)
        if model is not None and reducer:
            raise ValueError("pmod_hf: `reducer` applies at load (with pretrained=...); for a built model call "
                             "pmod.hf.apply_reducer(model, spec) first")
        limits = {name: int(value) for name, value in zip(PIXEL_LIMITS, (min_pixels, max_pixels)) if value}
        if model is not None:
            if processor is None:
                raise ValueError("pmod_hf: a built `model` needs its `processor` too")
            self._model = getattr(model, "module", model)
            self._processor = processor
            self._device = next(self._model.parameters()).device
            self._adopt_distributed_rank()
        elif pretrained is None:
            raise ValueError("pmod_hf: pass pretrained=<checkpoint folder or hub id> (or model and processor)")
        else:
            self._load(str(pretrained), device, device_map, attn_implementation, parse_dtype(dtype, "pmod_hf"),
                       limits)
            if reducer:
                self._model = apply_reducer(self._model, reducer)
        base_architecture(self._model)
        self._tokenizer = self._processor.tokenizer
        self._max_length = getattr(self._model.config.get_text_config(), "max_position_embeddings", None) or 4096
        self._visual_ids = visual_token_ids(self._model.config)
        text_config = self._model.config.get_text_config()
        self._schedule = getattr(self._model, "pmod_schedule", None) or schedule_from_config(text_config)
        self.efficiency = (EfficiencyLog(text_config, efficiency_dir, self._rank, self._model.dtype)
                           if log_efficiency else None)

    def _load(self, pretrained, device, device_map, attn_implementation, dtype, limits) -> None:
        from transformers import AutoProcessor

        spread = self._place(device, device_map)
        self._processor = AutoProcessor.from_pretrained(pretrained)
        if limits:
            self._processor = AutoProcessor.from_pretrained(pretrained, size=self._bounded_size(limits))
        model = load_vlm(pretrained, dtype=dtype or ("auto" if self._device.type == "cuda" else torch.float32),
                         attn_implementation=attn_implementation, device_map="auto" if spread else None)
        self._model = (model if spread else model.to(self._device)).eval()
        if spread:
            self._device = model.device
        logger.info("pmod_hf: %s (%s) on %s (rank %d of %d)", pretrained, type(model).__name__, self._device,
                    self._rank, self._world_size)

    def _bounded_size(self, limits: dict) -> dict:
        """The image processor's ``size`` with ``min_pixels`` / ``max_pixels`` as its shortest / longest edge (the
        pixel-count bounds of Qwen-VL processors)."""
        size = {key: value for key, value in dict(self._processor.image_processor.size).items() if value is not None}
        if "longest_edge" not in size:
            raise ValueError("pmod_hf: min_pixels / max_pixels apply to Qwen-VL image processors only")
        names = {"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}
        return {**size, **{names[name]: value for name, value in limits.items()}}

    def _prompt(self, context: str, num_images: int, continuation: str = "") -> str:
        parts = content_parts(context)
        if num_images and DEFAULT_IMAGE_TOKEN not in context:
            parts = [{"type": "image"}] * num_images + parts
        messages = [{"role": "user", "content": parts}]
        return self._processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + continuation

    def _prompt_ids(self, context: str, num_images: int) -> List[int]:
        return self._tokenizer(self._prompt(context, num_images), add_special_tokens=False)["input_ids"]

    def _inputs(self, prompts: Sequence[str], images: Sequence) -> Dict[str, torch.Tensor]:
        """The processor's batch (placeholders expanded, left padded), on the model's device and dtype."""
        batch = self._processor(text=list(prompts), images=list(images) or None, padding=True, padding_side="left",
                                return_tensors="pt")
        floating = {name for name, value in batch.items() if torch.is_floating_point(value)}
        return {name: value.to(self.device, dtype=self._model.dtype if name in floating else None)
                for name, value in batch.items()}

    @torch.inference_mode()
    def _generate_batch(self, items: List[Dict[str, Any]]) -> List[GenerationResult]:
        plan = plan_generation(items[0]["gen_kwargs"])
        inputs = self._inputs([self._prompt(item["context"], len(item["visuals"])) for item in items],
                              [visual for item in items for visual in item["visuals"]])
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self._tokenizer.eos_token_id
        output = self._model.generate(**inputs, pad_token_id=pad, use_cache=True, return_dict_in_generate=True,
                                      **plan.generate_kwargs)
        rows = output.sequences[:, inputs["input_ids"].shape[1]:].tolist()
        if self.efficiency is not None:
            self._log_efficiency(items, rows, inputs, output_cache(output))
        results = []
        for item, tokens in zip(items, rows):
            text = truncate_at_stop_strings(self._tokenizer.decode(tokens, skip_special_tokens=True),
                                            plan.stop_strings)
            counts = TokenCounts(input_tokens=len(item["ids"]), output_tokens=self._generated_length(tokens))
            results.append(GenerationResult(text=text, token_counts=counts))
        return results

    def _log_efficiency(self, items, rows, inputs, cache) -> None:
        """One record per sample: its real (unpadded) prompt tokens, the visual ones among them, and what each
        layer kept of those (from the cache, whose rows are the batch's unless generation expanded them)."""
        valid = inputs["attention_mask"].bool()
        visual = torch.isin(inputs["input_ids"], torch.tensor(self._visual_ids, device=valid.device)) & valid
        n_valid, n_vision = valid.sum(dim=1).tolist(), visual.sum(dim=1).tolist()
        num_layers = self._model.config.get_text_config().num_hidden_layers
        from_cache = isinstance(cache, PmodCache) and cache.prefill_vision is not None \
            and len(cache.prefill_vision) == len(items)
        for row, (item, tokens) in enumerate(zip(items, rows)):
            if item["padding"]:
                continue  # a copy lmms-eval adds so that every rank runs as many requests
            text_tokens = n_valid[row] - n_vision[row]
            if self._schedule is None:
                kept = [n_vision[row]] * num_layers
            elif from_cache:
                kept = kept_vision_from_cache(cache, num_layers, row, text_tokens, n_vision[row])
            else:
                kept = self._schedule.keep_counts(n_vision[row])
            self.efficiency.record(
                task=item["task"], split=item["split"], doc_id=item["doc_id"], prompt_tokens=len(item["ids"]),
                text_tokens=text_tokens, vision_tokens=n_vision[row], kept_vision=kept,
                generated_tokens=self._generated_length(tokens))
        self.efficiency.flush()

    @torch.inference_mode()
    def _continuation_logprob(self, context: str, continuation: str, visuals: Sequence) -> Tuple[float, bool]:
        prompt = self._prompt(context, len(visuals))
        context_ids = self._tokenizer(prompt, add_special_tokens=False)["input_ids"]
        whole_ids = self._tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        if whole_ids[:len(context_ids)] != context_ids or len(whole_ids) == len(context_ids):
            raise ValueError(f"pmod_hf: the continuation {continuation!r} changes how the prompt tokenizes")
        inputs = self._inputs([prompt + continuation], visuals)
        logits = self._model(**inputs).logits[0]
        return continuation_logprob(logits, whole_ids[len(context_ids):])
