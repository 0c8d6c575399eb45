"""What the lmms-eval models of this package share: argument checks, device placement and request batching.

A subclass (``pmod_llava`` for this package's LLaVA checkpoints, ``pmod_hf`` for transformers' own VLMs)
loads its model and says how one batch of prompts is answered (``_generate_batch``) and how a continuation is
scored (``_continuation_logprob``); this class groups lmms-eval's requests into batches with equal generation
kwargs, resolves every request's own task, split and document, and puts the answers back in order.

lmms-eval is imported here and in the adapters only; the rest of the package does not need it.
"""

import contextlib
import gc
import inspect
import logging
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from llava.eval.batching import kwargs_key, plan_batches, restore_order

logger = logging.getLogger(__name__)

_DTYPES = {
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def parse_dtype(dtype: Any, model_id: str = "pmod_llava") -> Optional[torch.dtype]:
    """`dtype=` model argument -> torch dtype; None or "auto" leaves the choice to the loader."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() == "auto":
        return None
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"{model_id}: dtype={dtype!r} is not one of auto, {', '.join(_DTYPES)}") from None


def as_bool(value: Any) -> bool:
    """lmms-eval passes model arguments as strings ("False")."""
    return value if isinstance(value, bool) else str(value).strip().lower() not in ("false", "0", "no", "")


def default_device(device: Optional[str]) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class BatchedModel(lmms):
    """An lmms-eval *simple* model that answers requests in left-padded batches (see the module docstring)."""

    is_simple = True
    model_id = "pmod"

    def _check_arguments(self, unknown: Dict[str, Any], batch_size: Any, use_cache: Any) -> None:
        if unknown:
            accepted = [name for name in inspect.signature(type(self).__init__).parameters
                        if name not in ("self", "unknown")]
            raise TypeError(f"{self.model_id}: unknown model argument(s) {', '.join(sorted(unknown))}; "
                            f"accepted: {', '.join(accepted)}")
        if not as_bool(use_cache):
            raise ValueError(f"{self.model_id}: use_cache=False is not supported (generation with images needs "
                             "the cache)")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"{self.model_id}: batch_size must be an integer, got {batch_size!r} ('auto' is not "
                             "supported)") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"{self.model_id}: batch_size must be >= 1, got {self.batch_size_per_gpu}")

    def _place(self, device: Optional[str], device_map: Optional[str]) -> bool:
        """Choose this process's device (its own rank's under accelerate / torchrun); True: spread the model
        over the GPUs of one process (``device_map=auto``)."""
        from accelerate import Accelerator, InitProcessGroupKwargs

        accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            self._device = accelerator.device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        else:
            self._device = default_device(device_map if device_map not in (None, "auto") else device)
        return device_map == "auto" and accelerator.num_processes == 1

    def _adopt_distributed_rank(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self._rank = torch.distributed.get_rank()
            self._world_size = torch.distributed.get_world_size()

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def config(self):
        return self._model.config

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def max_length(self) -> int:
        return self._max_length

    def clean(self) -> None:
        """Free cached memory but keep the model (lmms-eval's default deletes every nn.Module attribute)."""
        if self.efficiency is not None:
            self.efficiency.flush()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self._model.training
        self._model.eval()
        try:
            yield
        finally:
            self._model.train(was_training)

    def _doc(self, task: str, split: str, doc_id: int):
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError) as error:
            raise KeyError(f"{self.model_id}: no document {doc_id} in task {task!r} split {split!r} "
                           "(lm.task_dict must be filled by lmms-eval)") from error

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        for visual in visuals:
            if not hasattr(visual, "size") or not hasattr(visual, "convert"):
                raise TypeError(f"{self.model_id}: task {task!r} doc {doc_id} gave a {type(visual).__name__} "
                                "visual; only images (PIL) are supported")
        return [visual.convert("RGB") for visual in visuals]

    def _prompt_ids(self, context: str, num_images: int) -> List[int]:
        """The prompt's token ids, image placeholders unexpanded."""
        raise NotImplementedError

    def _generate_batch(self, items: List[Dict[str, Any]]) -> List[GenerationResult]:
        """Answers to a batch of prompts (``ids``, ``visuals``, ``gen_kwargs``, ...), all with or all without images."""
        raise NotImplementedError

    def _continuation_logprob(self, context: str, continuation: str, visuals: Sequence) -> Tuple[float, bool]:
        raise NotImplementedError

    def generate_until(self, requests: List[Instance]) -> List[GenerationResult]:
        """Batches of requests with equal generation kwargs, longest context first; images are loaded per batch."""
        pending = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            pending.append({"context": context, "gen_kwargs": gen_kwargs, "doc_to_visual": doc_to_visual,
                            "task": task, "split": split, "doc_id": doc_id,
                            "length": len(self._tokenizer(context, add_special_tokens=False)["input_ids"]),
                            "padding": bool((request.metadata or {}).get("__padding_only__"))})
        batches = list(plan_batches(pending, self.batch_size, group_key=lambda item: kwargs_key(item["gen_kwargs"]),
                                    length=lambda item: item["length"]))
        answered = []
        with self._eval_mode():
            for batch in tqdm(batches, disable=self.rank != 0, desc=f"{self.model_id} generate"):
                answered.extend(self._answer_batch(batch))
        return restore_order(len(requests), answered)

    def _answer_batch(self, batch) -> List[Tuple[int, GenerationResult]]:
        """Load the batch's images, then generate (image and text-only prompts in separate calls)."""
        for _, item in batch:
            item["visuals"] = self._visuals(item["doc_to_visual"], item["task"], item["split"], item["doc_id"])
            item["ids"] = self._prompt_ids(item["context"], len(item["visuals"]))
        answered = []
        for has_images in (True, False):
            part = [(index, item) for index, item in batch if bool(item["visuals"]) == has_images]
            if part:
                answers = self._generate_batch([item for _, item in part])
                answered.extend(zip([index for index, _ in part], answers))
        for _, item in batch:
            del item["visuals"]
        return answered

    def _generated_length(self, tokens: List[int]) -> int:
        eos = self._tokenizer.eos_token_id
        return tokens.index(eos) + 1 if eos in tokens else len(tokens)

    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        with self._eval_mode():
            return [self._loglikelihood_one(request)
                    for request in tqdm(requests, disable=self.rank != 0, desc=f"{self.model_id} loglikelihood")]

    def _loglikelihood_one(self, request: Instance) -> Tuple[float, bool]:
        context, target, doc_to_visual, doc_id, task, split = request.args
        continuation = target if isinstance(target, str) else target(self._doc(task, split, doc_id))
        if isinstance(continuation, (list, tuple)):
            continuation = continuation[0]
        if not continuation:
            raise ValueError(f"{self.model_id}: empty continuation for task {task!r} doc {doc_id}")
        visuals = self._visuals(doc_to_visual, task, split, doc_id)
        return self._continuation_logprob(context, str(continuation), visuals)

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError(f"{self.model_id} does not implement multi-round generation; none of the "
                                  "paper's 14 benchmarks needs it")


def continuation_logprob(logits: torch.Tensor, continuation_ids: Sequence[int]) -> Tuple[float, bool]:
    """Sum of the log-probabilities of a text continuation at the end of the sequence, and whether it is greedy.

    ``logits`` are one sequence's ``[length, vocab]``; the last ``len(continuation_ids)`` tokens are predicted
    by the positions just before them.
    """
    count = len(continuation_ids)
    logprobs = torch.log_softmax(logits[-count - 1:-1].float(), dim=-1)
    targets = torch.tensor(list(continuation_ids), device=logprobs.device)
    total = logprobs.gather(-1, targets[:, None]).sum().item()
    greedy = bool((logprobs.argmax(dim=-1) == targets).all().item())
    return float(total), greedy
