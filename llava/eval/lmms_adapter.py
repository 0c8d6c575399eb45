"""lmms-eval model `pmod_llava`: p-MoD and dense LLaVA checkpoints of this package, as a *simple* lmms-eval model.

Differences from lmms-eval's built-in `llava` adapter, on purpose:
- each request of a batch resolves its own task, split and document (the built-in one uses the first's);
- batches are left padded with an attention mask, so batch size does not change greedy answers;
- `until` stop strings are applied, and non-`generate()` kwargs never reach `generate()`;
- `loglikelihood` returns the log-probability of the continuation (not the loss) and its is-greedy flag;
- `clean()` keeps the model, so one adapter can evaluate a model during training again and again;
- optional per-sample efficiency records (prompt, vision and kept tokens, TFLOPs, KV cache).

Request batching, argument checks and device placement are shared with ``pmod_hf`` (``llava.eval.lmms_base``).
"""

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts

from llava.constants import IMAGE_TOKEN_INDEX
from llava.eval.batching import left_pad
from llava.eval.efficiency import EfficiencyLog, kept_vision_per_layer
from llava.eval.generation import plan_generation, truncate_at_stop_strings
from llava.eval.lmms_base import BatchedModel, as_bool, continuation_logprob, parse_dtype
from llava.eval.prompting import build_prompt
from llava.mm_utils import process_images, tokenizer_image_token

logger = logging.getLogger(__name__)


def _read_config_overrides(path: Optional[str]) -> Optional[dict]:
    """`customized_config=FILE.json`: config values to set before the model is built."""
    if not path:
        return None
    try:
        overrides = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"pmod_llava: customized_config={path}: not a readable JSON file ({error})") from error
    if not isinstance(overrides, dict):
        raise ValueError(f"pmod_llava: customized_config={path} must hold a JSON object of config values")
    return overrides


class PmodLlava(BatchedModel):
    """A LLaVA / p-MoD LLaVA checkpoint (or an already-built model) behind lmms-eval's simple-model API.

    Model arguments (`--model_args k=v,...`): `pretrained` (checkpoint folder), `model_base`,
    `model_name`, `conv_template` (default vicuna_v1), `device`, `batch_size`, `attn_implementation`
    (default sdpa), `dtype` (auto, float16, bfloat16, float32), `log_efficiency` (write per-sample
    efficiency records), `efficiency_dir` (where; default: kept in memory only), `reducer` (a training-free
    vision-token reducer for a dense checkpoint, e.g. `fastv_k2_keep0.25`; see `pmod.reducers`).
    For evaluation during training pass `model`, `tokenizer` and `image_processor` instead of `pretrained`;
    the model is put in eval mode while answering and given back in the mode it had. `max_batch_size` is
    accepted (lmms-eval passes it) and ignored.

    The arguments of lmms-eval's built-in `llava` model work too: `device_map` (`auto` spreads the model over
    the GPUs of one process; a device name is the device), `customized_config` (a JSON file of config values
    set before the model is built), `tie_weights`, `use_cache` (must stay True: generation with images needs
    the cache), and `truncation` / `truncate_context`, accepted with no effect (prompts are never cut here;
    the model truncates after image expansion, at the checkpoint's `tokenizer_model_max_length`).
    """

    model_id = "pmod_llava"

    def __init__(
        self,
        pretrained: Optional[str] = None,
        conv_template: str = "vicuna_v1",
        device: Optional[str] = None,
        batch_size: Any = 1,
        attn_implementation: Optional[str] = "sdpa",
        dtype: Any = None,
        model_base: Optional[str] = None,
        model_name: Optional[str] = None,
        log_efficiency: bool = False,
        efficiency_dir: Optional[str] = None,
        max_batch_size: Optional[int] = None,
        model: Optional[torch.nn.Module] = None,
        tokenizer: Any = None,
        image_processor: Any = None,
        device_map: Optional[str] = None,
        customized_config: Optional[str] = None,
        tie_weights: Any = True,
        use_cache: Any = True,
        truncation: Any = True,
        truncate_context: Any = False,
        reducer: Optional[str] = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        self._check_arguments(unknown, batch_size, use_cache)
        self.conv_template = str(conv_template)

        if model is not None and reducer:
            raise ValueError("pmod_llava: `reducer` applies at load (with pretrained=...); for a built model call "
                             "llava.model.reduce.apply_reducer(model, spec) first")
        if model is not None:
            self._adopt_built_model(model, tokenizer, image_processor)
        elif pretrained is None:
            raise ValueError("pmod_llava: pass pretrained=<checkpoint folder> (or model/tokenizer/image_processor)")
        else:
            self._load(str(pretrained), model_base, model_name, device, attn_implementation, parse_dtype(dtype),
                       device_map, _read_config_overrides(customized_config), reducer)
            if as_bool(tie_weights):
                self._model.tie_weights()

        self._pad_token_id = (self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None
                              else self._tokenizer.eos_token_id)
        tower = self._model.get_vision_tower() if hasattr(self._model, "get_vision_tower") else None
        self.efficiency = (EfficiencyLog(self._model.config, efficiency_dir, self._rank, self._model.dtype,
                                         tile_tokens=tower.num_patches if tower is not None else None)
                           if log_efficiency else None)

    def _load(self, pretrained, model_base, model_name, device, attn_implementation, dtype, device_map,
              overwrite_config, reducer) -> None:
        from llava.model.builder import load_pretrained_model

        spread = self._place(device, device_map)
        self._tokenizer, model, self._image_processor, self._max_length = load_pretrained_model(
            pretrained, model_base, model_name, device=str(self._device), dtype=dtype,
            attn_implementation=attn_implementation, device_map="auto" if spread else None,
            overwrite_config=overwrite_config, reducer=reducer)
        self._model = (model if spread else model.to(self._device)).eval()
        if spread:
            self._device = model.device
        self._tokenizer.padding_side = "left"
        logger.info("pmod_llava: %s on %s (rank %d of %d)", pretrained, self._device, self._rank, self._world_size)

    def _adopt_built_model(self, model, tokenizer, image_processor) -> None:
        if tokenizer is None or image_processor is None:
            raise ValueError("pmod_llava: a built `model` needs its `tokenizer` and `image_processor` too")
        model = getattr(model, "module", model)
        self._model = model
        self._tokenizer = tokenizer
        self._image_processor = image_processor
        self._max_length = getattr(model.config, "tokenizer_model_max_length", None) or 2048
        self._device = next(model.parameters()).device
        self._adopt_distributed_rank()

    def _image_inputs(self, visuals: Sequence) -> Tuple[Any, Optional[List[Tuple[int, int]]]]:
        """Processed images (per the checkpoint's pad/anyres setting) in the model's dtype, and their (w, h)."""
        if not visuals:
            return None, None
        images = process_images(list(visuals), self._image_processor, self._model.config)
        dtype = self._model.dtype
        if isinstance(images, (list, tuple)):
            images = [image.to(device=self.device, dtype=dtype) for image in images]
        else:
            images = images.to(device=self.device, dtype=dtype)
        return images, [visual.size for visual in visuals]

    def _prompt_ids(self, context: str, num_images: int) -> List[int]:
        prompt = build_prompt(context, num_images, self.conv_template)
        return list(tokenizer_image_token(prompt, self._tokenizer, IMAGE_TOKEN_INDEX))

    def _left_pad(self, sequences: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention_mask = left_pad(sequences, self._pad_token_id)
        return input_ids.to(self.device), attention_mask.to(self.device)

    @torch.inference_mode()
    def _generate_batch(self, items: List[Dict[str, Any]]) -> List[GenerationResult]:
        plan = plan_generation(items[0]["gen_kwargs"])
        input_ids, attention_mask = self._left_pad([item["ids"] for item in items])
        images, image_sizes = self._image_inputs([visual for item in items for visual in item["visuals"]])
        output = self._model.generate(
            input_ids, attention_mask=attention_mask, images=images, image_sizes=image_sizes,
            pad_token_id=self._pad_token_id, use_cache=True, **plan.generate_kwargs)
        if images is None:  # text-only prompts: generate() returns prompt and answer
            output = output[:, input_ids.shape[1]:]
        rows = output.tolist()
        if self.efficiency is not None:
            self._log_efficiency(items, rows, self._model.last_token_counts if images is not None else None)
        results = []
        for item, tokens in zip(items, rows):
            text = self._tokenizer.decode(tokens, skip_special_tokens=True)
            text = truncate_at_stop_strings(text, plan.stop_strings)
            counts_of_sample = TokenCounts(input_tokens=len(item["ids"]), output_tokens=self._generated_length(tokens))
            results.append(GenerationResult(text=text, token_counts=counts_of_sample))
        return results

    def _log_efficiency(self, items, rows, token_counts) -> None:
        """One record per sample from the prefill's token counts (`n_valid` = expanded prompt length);
        without images (`token_counts` None) the prompt is all text."""
        for sample, (item, tokens) in enumerate(zip(items, rows)):
            if item["padding"]:
                continue  # a copy lmms-eval adds so that every rank runs as many requests
            n_vision = token_counts.n_target[sample] if token_counts else 0
            n_valid = token_counts.n_valid[sample] if token_counts else len(item["ids"])
            self.efficiency.record(
                task=item["task"], split=item["split"], doc_id=item["doc_id"], prompt_tokens=len(item["ids"]),
                text_tokens=n_valid - n_vision, vision_tokens=n_vision,
                kept_vision=kept_vision_per_layer(self._model, sample, n_vision, self.efficiency.schedule),
                generated_tokens=self._generated_length(tokens))
        self.efficiency.flush()

    def _split_continuation(self, context: str, continuation: str, num_images: int) -> Tuple[List[int], List[int]]:
        """Token ids of the prompt and of the continuation, tokenized together as the model would see them."""
        prompt = build_prompt(context, num_images, self.conv_template)
        context_ids = list(tokenizer_image_token(prompt, self._tokenizer, IMAGE_TOKEN_INDEX))
        whole_ids = list(tokenizer_image_token(prompt + continuation, self._tokenizer, IMAGE_TOKEN_INDEX))
        if whole_ids[:len(context_ids)] == context_ids and len(whole_ids) > len(context_ids):
            return context_ids, whole_ids[len(context_ids):]
        return context_ids, list(self._tokenizer(continuation, add_special_tokens=False)["input_ids"])

    @torch.inference_mode()
    def _continuation_logprob(self, context: str, continuation: str, visuals: Sequence) -> Tuple[float, bool]:
        context_ids, continuation_ids = self._split_continuation(context, continuation, len(visuals))
        input_ids = torch.tensor([context_ids + continuation_ids], dtype=torch.long, device=self.device)
        images, image_sizes = self._image_inputs(visuals)
        logits = self._model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             images=images, image_sizes=image_sizes).logits[0]
        return continuation_logprob(logits, continuation_ids)
