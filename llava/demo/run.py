"""The end-to-end p-MoD demo on any machine, with nothing to download: `python -m llava.demo.run`.

Tiny models and synthetic shape data are made on the spot; stage 1 (projector), stage 2 dense and stage 2
p-MoD run through the same shell scripts and `llava.train.train` as on GPUs (one CPU process, fp32); both
models are evaluated through the lmms-eval plugin (`scripts/eval.sh`) on held-out questions; the report
compares accuracy per question type, LLM TFLOPs, KV cache and wall times, and token-selection figures show
which image tokens the p-MoD layers keep. `--scale tiny` is a seconds-long smoke run (CI), `full` the demo.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llava.demo.lmms_task import TASK_NAME, write_task
from llava.demo.report import ModelResult, build_report, read_eval_run
from llava.demo.synthetic import write_dataset
from llava.eval.deps import EvaluationDependencyError, check_lmms_eval

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Scale:
    """Data, model and training sizes of one demo run."""

    num_train: int
    num_eval: int
    image_size: int  # pixels; (image_size / 14)^2 image tokens
    llm_layers: int
    llm_hidden: int
    clip_hidden: int
    batch: int
    stage1_steps: int
    stage2_steps: int
    stage1_lr: float
    stage2_lr: float
    eval_batch: int
    figure_images: int


SCALES = {
    "tiny": Scale(num_train=32, num_eval=16, image_size=56, llm_layers=4, llm_hidden=64, clip_hidden=32, batch=4,
                  stage1_steps=2, stage2_steps=3, stage1_lr=1e-3, stage2_lr=1e-3, eval_batch=8, figure_images=1),
    "full": Scale(num_train=3000, num_eval=400, image_size=112, llm_layers=6, llm_hidden=128, clip_hidden=64,
                  batch=16, stage1_steps=60, stage2_steps=400, stage1_lr=1e-3, stage2_lr=1e-3, eval_batch=16,
                  figure_images=4),
}


def scale_with_overrides(name: str, overrides: list[str], presets: dict | None = None):
    """The preset `name` (of `presets`, default SCALES) with `KEY=VALUE` overrides of its fields
    (e.g. `stage2_steps=600`)."""
    preset = (presets or SCALES)[name]
    values = asdict(preset)
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or key not in values:
            raise ValueError(f"--set {override!r}: expected KEY=VALUE with KEY one of {', '.join(values)}")
        try:
            values[key] = type(values[key])(text)
        except ValueError:
            raise ValueError(f"--set {override!r}: {key} needs a {type(values[key]).__name__}") from None
    return type(preset)(**values)


def stage_header(title: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\n{title}\n{bar}", flush=True)


def run_logged(command: list[str], env: dict, log_file: Path) -> float:
    """Run `command` from the repository root, echoing its output live and into `log_file`; seconds taken."""
    start = time.perf_counter()
    with open(log_file, "wb") as log:
        process = subprocess.Popen([str(part) for part in command], cwd=REPO_ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while chunk := os.read(process.stdout.fileno(), 4096):
            log.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        returncode = process.wait()
    if returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed with exit code {returncode}; see {log_file}")
    return time.perf_counter() - start


def build_models(root: Path, scale: Scale, seed: int):
    """The tiny tokenizer + Llama and CLIP tower of this scale (random, seeded, built offline)."""
    from llava.tiny_models import (
        TinyModelPaths,
        build_tiny_clip,
        build_tiny_llama,
        build_tiny_tokenizer,
    )

    paths = TinyModelPaths(llm=str(root / "tiny-llama"), vision_tower=str(root / "tiny-clip"))
    tokenizer = build_tiny_tokenizer(paths.llm)
    build_tiny_llama(paths.llm, tokenizer, num_layers=scale.llm_layers, hidden=scale.llm_hidden,
                     intermediate=2 * scale.llm_hidden, seed=seed)
    build_tiny_clip(paths.vision_tower, image_size=scale.image_size, hidden=scale.clip_hidden, seed=seed)
    return paths


def base_env(out: Path) -> dict:
    env = dict(os.environ, **OFFLINE_ENV, PYTHON=sys.executable, HF_DATASETS_CACHE=str(out / "hf-datasets"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def train_env(out: Path, models, data, scale: Scale, steps: int, lr: float, output_dir: Path, **extra) -> dict:
    """What the stage scripts read: tiny models, one CPU process (`LAUNCHER=python`), fp32, the step budget."""
    return dict(base_env(out), LAUNCHER="python", NUM_GPUS="1", GLOBAL_BATCH=str(scale.batch),
                PER_DEVICE_BATCH=str(scale.batch), MAX_STEPS=str(steps), LR=str(lr), NUM_WORKERS="0",
                MODEL=models.llm, VISION_TOWER=models.vision_tower, IMAGE_FOLDER=data.image_folder,
                MODEL_MAX_LENGTH="256", GRADIENT_CHECKPOINTING="False", PRECISION_FLAGS="--bf16 False --tf32 False",
                SAVE_STEPS="1000000", OUTPUT_DIR=str(output_dir), **extra)


def train_flags(steps: int) -> list[str]:
    return ["--logging_steps", str(max(1, steps // 10)), "--save_strategy", "no", "--disable_tqdm", "False"]


def evaluate(out: Path, checkpoint: Path, task_folder: Path, scale: Scale, name: str) -> tuple[Path, float]:
    output_dir = out / "eval" / name
    env = dict(base_env(out), CKPT=str(checkpoint), TASKS=TASK_NAME, NUM_GPUS="0", BATCH_SIZE=str(scale.eval_batch),
               OUTPUT_DIR=str(output_dir), INCLUDE_PATH=str(task_folder), HF_HOME=str(out / "hf-home"))
    seconds = run_logged(["bash", "scripts/eval.sh"], env, out / "logs" / f"eval_{name}.log")
    return output_dir, seconds


def run_demo(out: Path, scale_name: str, seed: int = 0, overrides: list[str] = ()) -> dict:
    """Every stage of the demo; returns the report (also written to `out/report.md` and `out/report.json`)."""
    scale = scale_with_overrides(scale_name, list(overrides))
    out = out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    timings = {}

    stage_header(f"[1/6] synthetic data and tiny models (scale {scale_name}) -> {out}")
    start = time.perf_counter()
    data = write_dataset(out / "data", scale.num_train, scale.num_eval, scale.image_size, seed)
    models = build_models(out / "models", scale, seed)
    task_folder = write_task(out / "lmms_task", data.eval_json, data.image_folder)
    timings["setup"] = time.perf_counter() - start
    print(f"{data.num_train} training images, {data.num_eval} held-out questions, "
          f"{(scale.image_size // 14) ** 2} image tokens per image", flush=True)

    stage_header("[2/6] stage 1: projector alignment (scripts/pretrain.sh)")
    stage1 = out / "checkpoints" / "stage1"
    timings["stage1"] = run_logged(
        ["bash", "scripts/pretrain.sh", *train_flags(scale.stage1_steps)],
        train_env(out, models, data, scale, scale.stage1_steps, scale.stage1_lr, stage1, DATA_PATH=data.pretrain_json),
        out / "logs" / "stage1.log")

    results = {}
    for name, script in (("dense", "scripts/finetune.sh"), ("pmod", "scripts/finetune_pmod.sh")):
        label = "dense LLaVA" if name == "dense" else "p-MoD LLaVA"
        stage_header(f"[{3 if name == 'dense' else 4}/6] stage 2, {label} ({script})")
        checkpoint = out / "checkpoints" / name
        train_seconds = run_logged(
            ["bash", script, *train_flags(scale.stage2_steps)],
            train_env(out, models, data, scale, scale.stage2_steps, scale.stage2_lr, checkpoint,
                      DATA_PATH=data.instruct_json, PRETRAIN_ADAPTER=str(stage1 / "mm_projector.bin")),
            out / "logs" / f"stage2_{name}.log")
        results[name] = (checkpoint, train_seconds)

    stage_header("[5/6] evaluation through lmms-eval (scripts/eval.sh, model pmod_llava)")
    model_results = []
    for name, (checkpoint, train_seconds) in results.items():
        eval_dir, eval_seconds = evaluate(out, checkpoint, task_folder, scale, name)
        model_results.append(ModelResult(name, str(checkpoint), train_seconds, eval_seconds,
                                         **read_eval_run(eval_dir, data.eval_json)))

    stage_header("[6/6] token-selection figures and report")
    from llava.demo.figures import figures_for_eval_samples

    figure_paths = figures_for_eval_samples(results["pmod"][0], data.eval_json, data.image_folder,
                                            out / "figures", scale.figure_images)
    report = build_report(model_results, scale_name, asdict(scale), timings,
                          [str(path.relative_to(out)) for path in figure_paths])
    (out / "report.json").write_text(json.dumps(report["data"], indent=2))
    (out / "report.md").write_text(report["markdown"])
    print(report["markdown"], flush=True)
    print(f"report: {out / 'report.md'} and {out / 'report.json'}; figures under {out / 'figures'}", flush=True)
    return report["data"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default=os.environ.get("DEMO_SCALE", "full"), choices=sorted(SCALES),
                        help="tiny: a smoke run in well under a minute; full: the demo (default, or $DEMO_SCALE)")
    parser.add_argument("--out", default=os.environ.get("DEMO_DIR", "demo_output"),
                        help="output folder (default demo_output, or $DEMO_DIR)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the model weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change one size of the preset, e.g. --set stage2_steps=600 (repeatable)")
    args = parser.parse_args(argv)
    try:
        scale_with_overrides(args.scale, args.overrides)
    except ValueError as error:
        parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        check_lmms_eval()  # evaluation comes last: fail now, not after training
    except EvaluationDependencyError as error:
        parser.exit(1, f"demo: {error}\n")
    run_demo(Path(args.out), args.scale, args.seed, args.overrides)


if __name__ == "__main__":
    main()
