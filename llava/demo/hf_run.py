"""p-MoD on transformers' own VLMs, end to end with nothing to download: `python -m llava.demo.hf_run`.

For each family (default: Qwen2.5-VL and LLaVA-OneVision) a tiny random checkpoint with its processor is written
as the hub writes one (``llava.tiny_hf_models``); it is fine-tuned on the demo's synthetic shape data twice
through the family's recipe script (``scripts/finetune_pmod_<family>.sh``, ``llava.train.train_hf``): dense
(``PMOD=0``) and p-MoD (the official schedule, zero-initialised routers). The p-MoD checkpoint is reloaded with
``pmod.hf.from_pretrained``, and both are evaluated through the lmms-eval plugin (``scripts/eval.sh``, model
``pmod_hf``) on held-out questions; the report compares accuracy, LLM TFLOPs, KV cache and kept tokens per layer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llava.demo.lmms_task import write_task
from llava.demo.report import ModelResult, build_report, read_eval_run
from llava.demo.run import base_env, evaluate, run_logged, scale_with_overrides, stage_header
from llava.demo.synthetic import write_dataset

logger = logging.getLogger(__name__)
SCRIPTS = {"llava": "finetune_pmod_llava_hf.sh", "llava_next": "finetune_pmod_llava_next_hf.sh",
           "llava_onevision": "finetune_pmod_llava_onevision.sh", "qwen2_vl": "finetune_pmod_qwen2vl.sh",
           "qwen2_5_vl": "finetune_pmod_qwen2_5vl.sh"}
DEFAULT_FAMILIES = ("qwen2_5_vl", "llava_onevision")


@dataclass(frozen=True)
class HFScale:
    num_train: int
    num_eval: int
    image_size: int
    llm_layers: int
    batch: int
    steps: int
    lr: float
    eval_batch: int


HF_SCALES = {
    "tiny": HFScale(num_train=16, num_eval=8, image_size=56, llm_layers=6, batch=4, steps=3, lr=1e-3, eval_batch=8),
    "full": HFScale(num_train=1500, num_eval=200, image_size=84, llm_layers=6, batch=16, steps=300, lr=1e-3,
                    eval_batch=16),
}


def build_checkpoint(family: str, folder: Path, layers: int, seed: int) -> Path:
    """The family's tiny dense checkpoint; its generation stops at the tokenizer's end of turn."""
    from llava.tiny_hf_models import EOS_ID, save_tiny_checkpoint, tiny_vlm

    model = tiny_vlm(family, num_layers=layers, seed=seed)
    model.generation_config.eos_token_id = EOS_ID
    save_tiny_checkpoint(family, folder, model=model)
    return folder


def fine_tune(out: Path, family: str, base: Path, data, scale: HFScale, name: str) -> tuple[Path, float]:
    checkpoint = out / "checkpoints" / family / name
    env = dict(base_env(out), LAUNCHER="python", NUM_GPUS="1", GLOBAL_BATCH=str(scale.batch),
               PER_DEVICE_BATCH=str(scale.batch), MAX_STEPS=str(scale.steps), LR=str(scale.lr), NUM_WORKERS="0",
               MODEL=str(base), DATA_PATH=data.instruct_json, IMAGE_FOLDER=data.image_folder,
               GRADIENT_CHECKPOINTING="False", PRECISION_FLAGS="--bf16 False --tf32 False", SAVE_STEPS="1000000",
               OUTPUT_DIR=str(checkpoint), PMOD="1" if name == "pmod" else "0")
    flags = ["--logging_steps", str(max(1, scale.steps // 10)), "--save_strategy", "no"]
    seconds = run_logged(["bash", f"scripts/{SCRIPTS[family]}", *flags], env,
                         out / "logs" / f"train_{family}_{name}.log")
    return checkpoint, seconds


def check_reload(checkpoint: Path) -> str:
    """Reload the trained p-MoD checkpoint as users do, and say what came back."""
    from pmod.hf import from_pretrained, pmod_settings

    model = from_pretrained(checkpoint)
    routers = sum(1 for name, _ in model.named_parameters() if name.endswith("router.router.weight"))
    return (f"reloaded {type(model).__name__} with {routers} routers, schedule "
            f"{pmod_settings(model)['mod_target_layers']}")


def run_family(out: Path, family: str, scale: HFScale, scale_name: str, data, task_folder: Path,
               seed: int) -> dict:
    stage_header(f"{family}: tiny checkpoint, dense and p-MoD fine-tuning (scripts/{SCRIPTS[family]})")
    (out / family / "logs").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = build_checkpoint(family, out / "models" / family, scale.llm_layers, seed)
    timings = {"setup": time.perf_counter() - start}
    trained = {name: fine_tune(out, family, base, data, scale, name) for name in ("dense", "pmod")}
    print(check_reload(trained["pmod"][0]), flush=True)
    stage_header(f"{family}: evaluation through lmms-eval (scripts/eval.sh, model pmod_hf)")
    results = []
    for name, (checkpoint, train_seconds) in trained.items():
        eval_dir, eval_seconds = evaluate(out / family, checkpoint, task_folder, scale, name)
        results.append(ModelResult(name, str(checkpoint), train_seconds, eval_seconds,
                                   **read_eval_run(eval_dir, data.eval_json)))
    return build_report(results, f"{family}, {scale_name}", asdict(scale), timings, [])


def run_hf_demo(out: Path, scale_name: str, families=DEFAULT_FAMILIES, seed: int = 0, overrides=()) -> dict:
    """Every family's run; the reports go to `out/report.md` and `out/report.json`."""
    scale = scale_with_overrides(scale_name, list(overrides), HF_SCALES)
    out = out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data = write_dataset(out / "data", scale.num_train, scale.num_eval, scale.image_size, seed)
    task_folder = write_task(out / "lmms_task", data.eval_json, data.image_folder)
    reports = {family: run_family(out, family, scale, scale_name, data, task_folder, seed) for family in families}
    markdown = "\n".join(report["markdown"] for report in reports.values())
    (out / "report.md").write_text(markdown)
    (out / "report.json").write_text(json.dumps({family: report["data"] for family, report in reports.items()},
                                                indent=2))
    print(markdown, flush=True)
    print(f"report: {out / 'report.md'} and {out / 'report.json'}", flush=True)
    return {family: report["data"] for family, report in reports.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default=os.environ.get("DEMO_SCALE", "full"), choices=sorted(HF_SCALES),
                        help="tiny: a smoke run; full: the demo (default, or $DEMO_SCALE)")
    parser.add_argument("--families", default=",".join(DEFAULT_FAMILIES),
                        help=f"comma-separated, from {', '.join(SCRIPTS)} (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("DEMO_DIR", "demo_hf_output")))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the scale, e.g. --set steps=600")
    args = parser.parse_args(argv)
    families = tuple(args.families.split(","))
    unknown = sorted(set(families) - set(SCRIPTS))
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_hf_demo(args.out, args.scale, families, args.seed, args.overrides)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"demo_hf: {error}") from None


if __name__ == "__main__":
    main()
