"""The demo's dense vs p-MoD comparison: accuracy per question type, LLM cost, KV cache and wall times.

Accuracies are recomputed from lmms-eval's logged answers (`--log_samples`) so they can be split by
question type, and checked against the task score lmms-eval itself reported. Costs are the means of the
plugin's per-sample efficiency records (`pmod.accounting`: LLM prefill, batch 1, fp32 KV cache).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llava.demo.lmms_task import METRIC, TASK_NAME
from llava.demo.synthetic import CHANCE_ACCURACY, QUESTION_TYPES, answer_is_correct
from llava.eval.efficiency import load_records


@dataclass
class ModelResult:
    name: str
    checkpoint: str
    train_seconds: float
    eval_seconds: float
    accuracy: dict[str, float] = field(default_factory=dict)  # per question type and "overall", in percent
    lmms_eval_score: float = 0.0  # the task metric lmms-eval reported, in percent
    mean_tflops: float = 0.0
    mean_kv_cache_bytes: float = 0.0
    mean_vision_tokens: float = 0.0
    mean_kept_vision_per_layer: list[float] = field(default_factory=list)


def _logged_answers(eval_dir: Path) -> dict[int, str]:
    files = sorted(eval_dir.rglob(f"*_samples_{TASK_NAME}.jsonl"))
    if not files:
        raise FileNotFoundError(f"{eval_dir}: no lmms-eval samples file for {TASK_NAME} (was --log_samples set?)")
    answers = {}
    for line in files[-1].read_text().splitlines():
        sample = json.loads(line)
        response = sample["filtered_resps"]
        answers[sample["doc_id"]] = response[0] if isinstance(response, list) else response
    return answers


def _lmms_eval_score(eval_dir: Path) -> float:
    files = sorted(eval_dir.rglob("*_results.json"))
    if not files:
        raise FileNotFoundError(f"{eval_dir}: no lmms-eval results file")
    return 100.0 * json.loads(files[-1].read_text())["results"][TASK_NAME][f"{METRIC},none"]


def read_eval_run(eval_dir: str | Path, eval_json: str | Path) -> dict:
    """Accuracy per question type and mean costs of one `scripts/eval.sh` run on the demo task."""
    eval_dir = Path(eval_dir)
    questions = json.loads(Path(eval_json).read_text())
    answers = _logged_answers(eval_dir)
    if len(answers) != len(questions):
        raise ValueError(f"{eval_dir}: {len(answers)} logged answers for {len(questions)} questions")
    correct = {question_type: [] for question_type in QUESTION_TYPES}
    for doc_id, question in enumerate(questions):
        correct[question["question_type"]].append(answer_is_correct(answers[doc_id], question["answer"]))
    accuracy = {t: 100.0 * sum(hits) / len(hits) for t, hits in correct.items() if hits}
    accuracy["overall"] = 100.0 * sum(sum(hits) for hits in correct.values()) / len(questions)
    records = load_records(str(eval_dir / "efficiency"))
    if not records:
        raise FileNotFoundError(f"{eval_dir}/efficiency: no efficiency records (LOG_EFFICIENCY=1 expected)")
    count = len(records)
    layers = len(records[0]["kept_vision_per_layer"])
    return {
        "accuracy": accuracy,
        "lmms_eval_score": _lmms_eval_score(eval_dir),
        "mean_tflops": sum(r["tflops"] for r in records) / count,
        "mean_kv_cache_bytes": sum(r["kv_cache_bytes"] for r in records) / count,
        "mean_vision_tokens": sum(r["vision_tokens"] for r in records) / count,
        "mean_kept_vision_per_layer": [sum(r["kept_vision_per_layer"][i] for r in records) / count
                                       for i in range(layers)],
    }


def chance_accuracy() -> dict[str, float]:
    """Accuracy of guessing uniformly among the possible answers (types equally frequent)."""
    chance = {t: 100.0 * CHANCE_ACCURACY[t] for t in QUESTION_TYPES}
    chance["overall"] = sum(chance.values()) / len(QUESTION_TYPES)
    return chance


def _ratio(value: float, reference: float) -> str:
    return f"{100.0 * value / reference:.0f}%" if reference else "-"


def _counts(result: ModelResult) -> str:
    return " ".join(f"{value:.0f}" for value in result.mean_kept_vision_per_layer)


def build_report(results: list[ModelResult], scale_name: str, scale: dict, timings: dict,
                 figures: list[str]) -> dict:
    """{"markdown": the table as text, "data": everything as json-ready values}."""
    by_name = {result.name: result for result in results}
    dense, pmod = by_name["dense"], by_name["pmod"]
    chance = chance_accuracy()
    rows = [f"| {t} accuracy (%) | {chance[t]:.0f} | {dense.accuracy[t]:.1f} | {pmod.accuracy[t]:.1f} |"
            for t in (*QUESTION_TYPES, "overall")]
    kib = 1024.0
    lines = [
        f"## p-MoD demo ({scale_name} scale)",
        "",
        "| | chance | dense | p-MoD |",
        "|---|---|---|---|",
        *rows,
        f"| lmms-eval {METRIC} (%) | | {dense.lmms_eval_score:.1f} | {pmod.lmms_eval_score:.1f} |",
        (f"| LLM prefill TFLOPs per sample | | {dense.mean_tflops:.3g} | {pmod.mean_tflops:.3g} "
         f"({_ratio(pmod.mean_tflops, dense.mean_tflops)}) |"),
        (f"| KV cache per sample (KiB) | | {dense.mean_kv_cache_bytes / kib:.1f} | "
         f"{pmod.mean_kv_cache_bytes / kib:.1f} ({_ratio(pmod.mean_kv_cache_bytes, dense.mean_kv_cache_bytes)}) |"),
        f"| vision tokens kept per layer | | {_counts(dense)} | {_counts(pmod)} |",
        f"| stage-2 training wall time (s) | | {dense.train_seconds:.0f} | {pmod.train_seconds:.0f} |",
        f"| evaluation wall time (s) | | {dense.eval_seconds:.0f} | {pmod.eval_seconds:.0f} |",
        "",
        (f"Setup {timings.get('setup', 0):.0f} s"
         + (f", stage 1 {timings['stage1']:.0f} s" if "stage1" in timings else "")
         + ". TFLOPs and KV cache: LLM prefill of one held-out sample (pmod.accounting), means over samples."),
    ]
    if figures:
        lines += ["", "Token-selection figures (p-MoD model):", *[f"- {path}" for path in figures]]
    data = {"scale": scale_name, "sizes": scale, "timings_seconds": timings, "chance_accuracy": chance,
            "models": {result.name: asdict(result) for result in results}, "figures": figures}
    return {"markdown": "\n".join(lines) + "\n", "data": data}
