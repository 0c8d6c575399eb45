"""One table of an lmms-eval run in the paper's units: `python -m llava.eval.summarize OUTPUT_DIR`.

Reads every `*_results.json` under OUTPUT_DIR (the newest file wins for a task evaluated twice) and the
efficiency records written by the plugin (`efficiency*.jsonl`), prints a markdown table (benchmark,
metric, score) and writes it to OUTPUT_DIR/summary.md.

Units follow the paper (Tables 1 and 2): accuracies in percent, MME as the perception score (0-2000),
POPE as the F1 score averaged over its three splits, MMBench as lmms-eval's score (already percent).
The averages divide MME by 2000 (then x100), as the paper does; an average is shown only when all of
its benchmarks are present. Tasks the paper does not use are listed with their raw metrics.
"""

import argparse
import glob
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from llava.eval.efficiency import load_records, summarize_records

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    """A paper benchmark: its lmms-eval task(s), the metric read, and how to reach the paper's unit."""

    label: str
    tasks: Tuple[str, ...]
    metric: str
    scale: float = 100.0
    average_scale: Optional[float] = None

    def average_unit(self, value: float) -> float:
        """The value as it enters the paper's averages (percent)."""
        return value * self.average_scale if self.average_scale is not None else value


BENCHMARKS: Tuple[Benchmark, ...] = (
    Benchmark("SEED", ("seedbench",), "seed_image,none"),
    Benchmark("RWQA", ("realworldqa",), "exact_match,none"),
    Benchmark("MME", ("mme",), "mme_perception_score,none", scale=1.0, average_scale=100.0 / 2000.0),
    Benchmark("MMB", ("mmbench_en_dev",), "gpt_eval_score,none", scale=1.0),
    Benchmark("POPE", ("pope_adv", "pope_pop", "pope_random"), "pope_f1_score,none"),
    Benchmark("GQA", ("gqa",), "exact_match,none"),
    Benchmark("AI2D", ("ai2d",), "exact_match,flexible-extract"),
    Benchmark("DocVQA", ("docvqa_val",), "anls,none"),
    Benchmark("ChartQA", ("chartqa",), "relaxed_overall,none"),
    Benchmark("TextVQA", ("textvqa_val",), "exact_match,none"),
    Benchmark("InfoVQA", ("infovqa_val",), "anls,none"),
    Benchmark("OK-VQA", ("ok_vqa_val2014",), "exact_match,none"),
    Benchmark("MMMU", ("mmmu_val",), "mmmu_acc,none"),
    Benchmark("SQA", ("scienceqa_img",), "exact_match,none"),
)
TASK_ALIASES = {"mmbench_en_dev_static": "mmbench_en_dev"}
"""Offline stand-ins that report under the paper benchmark's name."""

AVERAGES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("AVG Table 1", ("SEED", "RWQA", "MME", "MMB", "POPE", "GQA", "AI2D")),
    ("AVG Table 2", ("DocVQA", "ChartQA", "TextVQA", "InfoVQA", "OK-VQA", "MMMU", "SQA")),
    ("AVG 14", tuple(b.label for b in BENCHMARKS)),
)


@dataclass(frozen=True)
class Row:
    benchmark: str
    metric: str
    value: float

    def formatted(self) -> str:
        return f"{self.value:.4g}" if abs(self.value) < 0.01 and self.value != 0 else f"{self.value:.2f}"


def load_results(output_dir: str) -> Dict[str, Dict[str, object]]:
    """Per-task metric dicts from every `*_results.json` under `output_dir`, newest file last (it wins)."""
    paths = sorted(glob.glob(os.path.join(output_dir, "**", "*_results.json"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {output_dir}")
    merged: Dict[str, Dict[str, object]] = {}
    for path in sorted(paths, key=os.path.getmtime):
        with open(path, encoding="utf-8") as handle:
            try:
                results = json.load(handle)["results"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{path} is not an lmms-eval results file: {error}") from error
        for task, metrics in results.items():
            merged[TASK_ALIASES.get(task, task)] = metrics
    return merged


def _metric_label(key: str) -> str:
    """`exact_match,none` -> `exact_match`; a real filter stays (`exact_match,flexible-extract`)."""
    return key[: -len(",none")] if key.endswith(",none") else key


def _numeric_metrics(metrics: Dict[str, object]) -> List[Tuple[str, float]]:
    return [(key, float(value)) for key, value in metrics.items()
            if "_stderr" not in key and key != "alias" and isinstance(value, (int, float))
            and not isinstance(value, bool)]


def paper_rows(results: Dict[str, Dict[str, object]]) -> Tuple[List[Row], Dict[str, float]]:
    """Rows for the paper's benchmarks present in `results`, and each one's value in average units."""
    rows, for_average = [], {}
    for benchmark in BENCHMARKS:
        values = []
        for task in benchmark.tasks:
            value = results.get(task, {}).get(benchmark.metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.append(float(value))
        if len(values) != len(benchmark.tasks):
            continue
        value = sum(values) / len(values) * benchmark.scale
        rows.append(Row(benchmark.label, _metric_label(benchmark.metric), value))
        for_average[benchmark.label] = benchmark.average_unit(value)
    return rows, for_average


def average_rows(for_average: Dict[str, float]) -> List[Row]:
    """The paper's averages whose benchmarks are all present."""
    return [Row(name, "mean %", sum(for_average[label] for label in labels) / len(labels))
            for name, labels in AVERAGES if all(label in for_average for label in labels)]


def other_rows(results: Dict[str, Dict[str, object]]) -> List[Row]:
    """Raw metrics of tasks that are not part of the paper's table."""
    known = {task for benchmark in BENCHMARKS for task in benchmark.tasks}
    rows = []
    for task in sorted(results):
        if task in known:
            continue
        rows.extend(Row(task, _metric_label(key), value) for key, value in _numeric_metrics(results[task]))
    return rows


def efficiency_rows(output_dir: str) -> List[Row]:
    """Mean cost per sample from the plugin's records; also written to `efficiency_summary.json`."""
    records = load_records(output_dir)
    if not records:
        return []
    summary = summarize_records(records)
    with open(os.path.join(output_dir, "efficiency_summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return [Row("Efficiency", "samples", summary["samples"]),
            Row("Efficiency", "mean text tokens", summary["mean_text_tokens"]),
            Row("Efficiency", "mean vision tokens", summary["mean_vision_tokens"]),
            Row("Efficiency", "mean inference TFLOPs", summary["mean_tflops"]),
            Row("Efficiency", "mean dense TFLOPs", summary["mean_dense_tflops"]),
            Row("Efficiency", "TFLOPs vs dense %", 100.0 * summary["tflops_ratio"]),
            Row("Efficiency", "KV cache, vision tokens %", 100.0 * summary["vision_kv_ratio"]),
            Row("Efficiency", "KV cache, all tokens %", 100.0 * summary["kv_cache_ratio"])]


def build_table(rows: Sequence[Row]) -> str:
    lines = ["| benchmark | metric | score |", "|---|---|---:|"]
    lines.extend(f"| {row.benchmark} | {row.metric} | {row.formatted()} |" for row in rows)
    return "\n".join(lines) + "\n"


def summarize(output_dir: str) -> str:
    """The markdown table for `output_dir`; also written to `output_dir/summary.md`."""
    results = load_results(output_dir)
    rows, for_average = paper_rows(results)
    table = build_table(rows + average_rows(for_average) + other_rows(results) + efficiency_rows(output_dir))
    with open(os.path.join(output_dir, "summary.md"), "w", encoding="utf-8") as handle:
        handle.write(table)
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the --output_path of the lmms-eval run(s)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.output_dir):
        parser.error(f"output_dir {args.output_dir} is not a folder")
    try:
        table = summarize(args.output_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
