"""Per-sample inference cost of an evaluation: prompt, vision and kept tokens, prefill TFLOPs and KV cache.

Each generated sample gets one record (a json line in `efficiency_rank{R}.jsonl`). Costs come from
`pmod.accounting.estimate` with the paper's convention (LLM prefill, batch 1, no LM head, no vision
tower), for the sample's real token counts, beside the dense model on the same input. Kept vision
tokens per layer are what the p-MoD model reports for its last routed forward (`last_routing_stats`),
which equals the schedule's keep counts by construction; dense layers keep every vision token. A dense
model loaded with a training-free reducer (``reducer=...``) is costed as that reducer.
"""

import glob
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import torch

from pmod.accounting import ModelShape, estimate
from pmod.reducers import REDUCER_CONFIG_KEY, parse_reducer
from pmod.schedule import schedule_from_config

logger = logging.getLogger(__name__)

RECORD_GLOB = "efficiency_rank*.jsonl"
_KV_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def kept_vision_per_layer(model, sample: int, n_vision: int, schedule) -> List[int]:
    """Vision tokens each decoder layer kept for `sample` of the last batch (dense layers keep all)."""
    num_layers = model.config.num_hidden_layers
    stats = getattr(model.get_model(), "last_routing_stats", None)
    if stats is not None and sample < len(stats.n_vision) and stats.n_vision[sample] == n_vision:
        return [stats.kept_vision[layer][sample] if layer in stats.kept_vision else n_vision
                for layer in range(num_layers)]
    if schedule is not None:
        return schedule.keep_counts(n_vision)
    return [n_vision] * num_layers


class EfficiencyLog:
    """Collects per-sample efficiency records; appends them to `efficiency_rank{rank}.jsonl` in `output_dir`."""

    def __init__(self, config, output_dir: Optional[str], rank: int, dtype: Optional[torch.dtype] = None,
                 tile_tokens: Optional[int] = None):
        """`tile_tokens`: patch tokens of one tile of the vision tower, which VisionZip's records cost against."""
        self.tile_tokens = tile_tokens
        self.shape = ModelShape.from_config(config)
        reducer = getattr(config, REDUCER_CONFIG_KEY, None)
        self.reducer = parse_reducer(reducer) if reducer else None
        self.schedule = schedule_from_config(config)
        self.kv_dtype = _KV_DTYPES.get(dtype, "float16")
        self.records: List[Dict] = []
        self._unwritten: List[Dict] = []
        self.path = None
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            self.path = os.path.join(output_dir, f"efficiency_rank{rank}.jsonl")
            open(self.path, "w", encoding="utf-8").close()
        else:
            logger.warning("pmod_llava: log_efficiency without efficiency_dir keeps the records in memory only")

    def record(self, *, task: str, split: str, doc_id: int, prompt_tokens: int, text_tokens: int,
               vision_tokens: int, kept_vision: Sequence[int], generated_tokens: int) -> Dict:
        """Cost one sample: `text_tokens` + `vision_tokens` are what the decoder saw at prefill. Under VisionZip
        the LLM saw D + C tokens per image; the record states the tower's own count beside them."""
        n_tiles = None
        if self.reducer is not None and self.reducer.merges_before_llm and vision_tokens and self.tile_tokens:
            n_tiles = vision_tokens // self.reducer.tokens_per_image
            vision_tokens = n_tiles * self.tile_tokens
        report = estimate(self.shape, self.schedule, text_tokens, vision_tokens, kv_dtype=self.kv_dtype,
                          reducer=self.reducer, n_tiles=n_tiles)
        entry = {
            "task": task, "split": split, "doc_id": doc_id,
            "prompt_tokens": prompt_tokens, "text_tokens": text_tokens, "vision_tokens": vision_tokens,
            "generated_tokens": generated_tokens, "kept_vision_per_layer": list(kept_vision),
            "tflops": report.total_flops / 1e12, "dense_tflops": report.dense_total_flops / 1e12,
            "kv_cache_bytes": report.kv_bytes, "dense_kv_cache_bytes": report.dense_kv_bytes,
            "vision_kv_ratio": report.vision_kv_ratio,
        }
        self.records.append(entry)
        self._unwritten.append(entry)
        return entry

    def flush(self) -> None:
        if self.path is None or not self._unwritten:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            for entry in self._unwritten:
                handle.write(json.dumps(entry) + "\n")
        self._unwritten = []

    def summary(self) -> Dict[str, float]:
        return summarize_records(self.records)


def summarize_records(records: Sequence[Dict]) -> Dict[str, float]:
    """Means over samples; ratios are of summed costs (p-MoD / dense on the same inputs)."""
    if not records:
        raise ValueError("no efficiency records to summarize")
    count = len(records)

    def mean(key):
        return sum(entry[key] for entry in records) / count

    return {
        "samples": count,
        "mean_text_tokens": mean("text_tokens"),
        "mean_vision_tokens": mean("vision_tokens"),
        "mean_generated_tokens": mean("generated_tokens"),
        "mean_tflops": mean("tflops"),
        "mean_dense_tflops": mean("dense_tflops"),
        "tflops_ratio": sum(e["tflops"] for e in records) / sum(e["dense_tflops"] for e in records),
        "kv_cache_ratio": (sum(e["kv_cache_bytes"] for e in records)
                           / sum(e["dense_kv_cache_bytes"] for e in records)),
        "vision_kv_ratio": mean("vision_kv_ratio"),
    }


def load_records(output_dir: str) -> List[Dict]:
    """All records under `output_dir` (every rank's file); a broken line names its file and line."""
    records = []
    for path in sorted(glob.glob(os.path.join(output_dir, "**", RECORD_GLOB), recursive=True)):
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path} line {number}: not a json record ({error})") from error
    return records
