"""Vision-token reduction methods side by side on one checkpoint, at matched budgets, in one table and a plot.

    bash scripts/compare.sh                                   # embedded tiny default (builds the tiny demo)
    DENSE=checkpoints/llava-v1.5-7b PMOD=checkpoints/pmod-llava-v1.5-7b TASKS=mme,pope_full \\
        bash scripts/compare.sh --budgets 0.333,0.222,0.111

Every method runs on the same dense checkpoint through ``scripts/eval.sh`` (lmms-eval, model ``pmod_llava``
with ``reducer=...``); p-MoD checkpoints (``--pmod``) run as they are. A budget is the layer-averaged share
of vision tokens (T_avg / N: 192, 128, 64 of 576 are 0.333, 0.222, 0.111), and each method family is set to
meet it (``pmod.reducers.for_budget``); a budget a family cannot reach is reported, not run. Per run the
table gives accuracy per task, the measured T_avg share, TFLOPs and KV cache from the plugin's efficiency
records (``pmod.accounting``), and the LLM prefill latency of one image prompt timed in this process,
dense first, as a ratio to dense. Output: ``comparison.md``, ``comparison.json``, ``accuracy_vs_tflops.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llava.eval.efficiency import load_records, summarize_records
from llava.eval.summarize import BENCHMARKS, load_results

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FAMILIES = "fastv,pdrop,visionzip,random,uniform"


@dataclass
class Run:
    """One evaluated setting: the dense model, a reducer on it, or a p-MoD checkpoint."""

    name: str  # table label: "dense", a reducer spec, or "p-MoD <folder>"
    checkpoint: str
    reducer: str | None = None
    budget: float | None = None  # the requested T_avg share, for reducers
    scores: dict[str, float] = field(default_factory=dict)  # task -> metric value
    vision_share: float | None = None  # measured T_avg / N over the evaluated samples with images
    tflops: float | None = None
    tflops_ratio: float | None = None
    kv_ratio: float | None = None
    prefill_ms: float | None = None
    prefill_ratio: float | None = None

    @property
    def mean_score(self) -> float | None:
        return sum(self.scores.values()) / len(self.scores) if self.scores else None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m llava.eval.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", help="dense LLaVA checkpoint the reducers run on (default: the tiny demo's)")
    parser.add_argument("--pmod", action="append", default=[], help="a p-MoD checkpoint to add (repeatable)")
    parser.add_argument("--methods", default=DEFAULT_FAMILIES,
                        help=f"reducer families set to each budget (default {DEFAULT_FAMILIES}; e.g. fastv_k3, "
                             "pdrop_layers8-16-24, random_seed1)")
    parser.add_argument("--budgets", default="0.333,0.222,0.111",
                        help="T_avg shares of the vision tokens (default 0.333,0.222,0.111 = 192/128/64 of 576)")
    parser.add_argument("--specs", default="", help="extra reducer specs run as given, e.g. fastv_k2_keep0.5")
    parser.add_argument("--n-vision", type=int,
                        help="vision tokens per image the budgets are solved for (default: one tile of the "
                             "checkpoint's tower, e.g. 576 for CLIP-L/336)")
    parser.add_argument("--tasks", default=os.environ.get("TASKS"), help="lmms-eval tasks (default: the demo's)")
    parser.add_argument("--include-path", default=os.environ.get("INCLUDE_PATH"), help="extra lmms-eval task folder")
    parser.add_argument("--limit", type=int, help="lmms-eval --limit (samples per task)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default=None, help="device for the latency timing (default: cuda if present)")
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("compare_output"))
    parser.add_argument("--demo-scale", default="full", choices=("tiny", "full"),
                        help="without --dense: the demo built and compared (tiny: a smoke run; full: default)")
    return parser.parse_args(argv)


def demo_checkpoints(out: Path, scale: str) -> tuple[str, str, str, str]:
    """The embedded default: the demo's dense and p-MoD checkpoints and its lmms-eval task (built once into
    ``out/demo-<scale>``, reused by later runs)."""
    from llava.demo.lmms_task import TASK_NAME
    from llava.demo.run import run_demo

    demo = out / f"demo-{scale}"
    if not (demo / "report.json").exists():
        run_demo(demo, scale)
    return str(demo / "checkpoints" / "dense"), str(demo / "checkpoints" / "pmod"), TASK_NAME, str(demo / "lmms_task")


def plan_runs(dense: str, pmod: list[str], families: list[str], budgets: list[float], specs: list[str],
              n_vision: int, num_layers: int) -> tuple[list[Run], list[str]]:
    """Runs in table order, and a note for each family/budget pair that cannot be met."""
    from pmod.reducers import for_budget, parse_reducer

    runs, notes = [Run("dense", dense)], []
    for family in families:
        for budget in budgets:
            try:
                spec = for_budget(family, budget, n_vision, num_layers)
            except ValueError as error:
                notes.append(f"{family} at {budget:g}: {error}")
                continue
            runs.append(Run(spec.name, dense, spec.name, budget))
    runs.extend(Run(parse_reducer(spec).name, dense, parse_reducer(spec).name) for spec in specs)
    runs.extend(Run(f"p-MoD {Path(path).name}", path) for path in pmod)
    return runs, notes


def tower_tokens(config) -> int:
    """Patch tokens of one tile of the checkpoint's vision tower; 576 (CLIP-L/336) when its config is not local."""
    from transformers import AutoConfig

    try:
        tower = AutoConfig.from_pretrained(config.mm_vision_tower)
    except (OSError, ValueError, AttributeError):
        logger.warning("vision tower config not found locally; solving budgets for 576 tokens (--n-vision)")
        return 576
    tower = getattr(tower, "vision_config", tower)
    return (tower.image_size // tower.patch_size) ** 2


def evaluate(run: Run, out: Path, tasks: str, include_path: str | None, limit: int | None, batch_size: int) -> None:
    """One ``scripts/eval.sh`` run; fills the run's scores and costs."""
    output_dir = out / "runs" / run.name.replace(" ", "_")
    env = dict(os.environ, CKPT=run.checkpoint, TASKS=tasks, OUTPUT_DIR=str(output_dir), BATCH_SIZE=str(batch_size),
               LOG_EFFICIENCY="1", PYTHON=sys.executable)
    if "NUM_GPUS" not in env and not _cuda():
        env["NUM_GPUS"] = "0"  # one CPU process; on GPUs eval.sh uses every visible one
    if run.reducer:
        env["EXTRA_MODEL_ARGS"] = ",".join(filter(None, [os.environ.get("EXTRA_MODEL_ARGS"), f"reducer={run.reducer}"]))
    if include_path:
        env["INCLUDE_PATH"] = include_path
    command = ["bash", str(REPO_ROOT / "scripts" / "eval.sh")] + (["--limit", str(limit)] if limit else [])
    log = out / "logs" / f"{output_dir.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as handle:
        result = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{run.name}: scripts/eval.sh failed ({result.returncode}); see {log}")
    run.scores = task_scores(load_results(str(output_dir)))
    records = load_records(str(output_dir / "efficiency"))
    if records:
        summary = summarize_records(records)
        with_images = [r for r in records if r["vision_tokens"]]
        run.vision_share = (sum(r["vision_kv_ratio"] for r in with_images) / len(with_images)) if with_images else None
        run.tflops, run.tflops_ratio, run.kv_ratio = (summary["mean_tflops"], summary["tflops_ratio"],
                                                      summary["kv_cache_ratio"])


def task_scores(results: dict) -> dict[str, float]:
    """One number per task: the paper's metric for its benchmarks, else the task's first numeric metric."""
    paper_metric = {task: benchmark.metric for benchmark in BENCHMARKS for task in benchmark.tasks}
    scores = {}
    for task, metrics in sorted(results.items()):
        key = paper_metric.get(task) or next(
            (k for k, v in metrics.items() if "_stderr" not in k and isinstance(v, (int, float))
             and not isinstance(v, bool)), None)
        if key is not None and isinstance(metrics.get(key), (int, float)):
            scores[task] = float(metrics[key])
    return scores


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def time_prefills(runs: list[Run], device: str | None, repeats: int) -> None:
    """Median LLM prefill of one image prompt per run, in one process (dense model first, reducers toggled on
    the same weights); p-MoD checkpoints are loaded in turn."""
    import torch

    from benchmarks.timing import measure
    from llava.model.builder import load_pretrained_model
    from llava.model.reduce import apply_reducer, remove_reducer

    device = torch.device(device or ("cuda" if _cuda() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    checkpoint = loaded = None
    for run in runs:
        if run.checkpoint != checkpoint:  # one checkpoint in memory at a time
            checkpoint, loaded = run.checkpoint, load_pretrained_model(run.checkpoint, device=str(device), dtype=dtype)
        tokenizer, model, image_processor, _ = loaded
        if run.reducer:
            model = apply_reducer(model, run.reducer)
        inputs = _one_image_prompt(model, tokenizer, image_processor, device, dtype)
        with torch.no_grad():
            timing = measure(lambda: model(**inputs, use_cache=True, logits_to_keep=1), device, warmup=2,
                             repeats=repeats)
        run.prefill_ms = timing.median_s * 1000
        if run.reducer:
            remove_reducer(model)
    dense = runs[0].prefill_ms
    for run in runs:
        run.prefill_ratio = run.prefill_ms / dense


def _one_image_prompt(model, tokenizer, image_processor, device, dtype) -> dict:
    from PIL import Image

    from llava.eval.prompting import build_prompt
    from llava.mm_utils import process_images, tokenizer_image_token

    size = image_processor.crop_size
    image = Image.new("RGB", (size["width"], size["height"]), (120, 80, 200))
    prompt = build_prompt("Describe the image in one word.", 1, "vicuna_v1")
    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None].to(device)
    images = process_images([image], image_processor, model.config)
    images = [i.to(device, dtype) for i in images] if isinstance(images, list) else images.to(device, dtype)
    return {"input_ids": ids, "images": images, "image_sizes": [image.size]}


def markdown(runs: list[Run], notes: list[str]) -> str:
    tasks = sorted({task for run in runs for task in run.scores})
    header = ["method", "budget", "T_avg share", *tasks, "TFLOPs", "vs dense", "KV vs dense", "prefill ms",
              "prefill vs dense"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value, pattern):
        return "-" if value is None else format(value, pattern)

    for run in runs:
        cells = [run.name, fmt(run.budget, ".3f"), fmt(run.vision_share, ".3f"),
                 *(fmt(run.scores.get(task), ".3f") for task in tasks), fmt(run.tflops, ".4g"),
                 fmt(run.tflops_ratio, ".3f"), fmt(run.kv_ratio, ".3f"), fmt(run.prefill_ms, ".2f"),
                 fmt(run.prefill_ratio, ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\nNot run: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dense, pmod, tasks, include_path = args.dense, list(args.pmod), args.tasks, args.include_path
    if dense is None:
        dense, demo_pmod, demo_task, demo_tasks = demo_checkpoints(out, args.demo_scale)
        pmod = pmod or [demo_pmod]
        tasks, include_path = tasks or demo_task, include_path or demo_tasks
    if not tasks:
        raise SystemExit("--tasks (or TASKS) is required with --dense")

    from llava.model.checkpoint_config import load_checkpoint_config

    config = load_checkpoint_config(dense)
    num_layers = config.num_hidden_layers
    n_vision = args.n_vision or tower_tokens(config)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    families = [f for f in args.methods.split(",") if f]
    specs = [s for s in args.specs.split(",") if s]
    runs, notes = plan_runs(dense, pmod, families, budgets, specs, n_vision, num_layers)
    for note in notes:
        logger.warning("not run: %s", note)
    for run in runs:
        logger.info("evaluating %s", run.name)
        evaluate(run, out, tasks, include_path, args.limit, args.batch_size)
    time_prefills(runs, args.device, args.latency_repeats)

    table = markdown(runs, notes)
    (out / "comparison.md").write_text(table)
    (out / "comparison.json").write_text(json.dumps({"runs": [asdict(run) for run in runs], "not_run": notes},
                                                    indent=2))
    from llava.eval.compare_plot import plot_accuracy_vs_tflops

    plot_accuracy_vs_tflops(runs, out / "accuracy_vs_tflops.png")
    print(table, flush=True)
    print(f"written: {out / 'comparison.md'}, comparison.json, accuracy_vs_tflops.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
