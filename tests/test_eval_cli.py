"""End to end through lmms-eval's CLI and scripts/eval.sh: offline fixture tasks, a tiny p-MoD checkpoint.

The fixture tasks reuse lmms-eval's real MME and POPE scoring code on tiny parquet data sets. Two POPE-style
tasks with identical generation kwargs make batches that mix tasks and splits. Loglikelihood is tested in
process only: lmms-eval 0.7.3's evaluator turns every (logprob, is_greedy) answer into a string
(`unwrap_generation_output`), so its multiple-choice tasks fail for every model.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("lmms_eval")
pytestmark = [pytest.mark.slow, pytest.mark.compat]

from llava.eval.tiny_checkpoint import build_tiny_llava_checkpoint  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS = "pmod_ci_mme,pmod_ci_pope_a,pmod_ci_pope_b"
GENERATION = """generation_kwargs:
  max_new_tokens: 4
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
"""
SHORT_ANSWER = """lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
metadata:
  - version: 0.0
"""


def _image(i, size_step=11):
    return Image.new("RGB", (28 + size_step * i, 84 - 7 * (i % 4)), ((47 * i) % 256, (91 * i + 40) % 256, 160))


def _write_parquet(path, rows):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    columns = {key: Value("string") for key in rows[0] if key != "image"}
    Dataset.from_list(rows, features=Features({**columns, "image": ImageFeature()})).to_parquet(str(path))


def _mme_rows():
    """Three MME-style question pairs (two perception categories, one cognition), one yes and one no each."""
    rows = []
    for pair, category in enumerate(["color", "count", "code_reasoning"]):
        for answer in ("Yes", "No"):
            rows.append({"question_id": f"q{pair}.png", "question": f"Is it shape {pair}? Please answer yes or no.",
                         "answer": answer, "category": category, "image": _image(2 * pair + (answer == "No"))})
    return rows


def lmms_mme_score(answers):
    """MME perception score of `answers` (one per row, in row order) by lmms-eval's own MME functions."""
    from lmms_eval.tasks.mme.utils import mme_aggregate_results, mme_process_results

    scored = [mme_process_results(row, [answer]) for row, answer in zip(_mme_rows(), answers)]
    return mme_aggregate_results([s["mme_perception_score"] for s in scored if "mme_perception_score" in s])


def _mme_task(root):
    folder = root / "pmod_ci_mme"
    folder.mkdir()
    _write_parquet(folder / "test.parquet", _mme_rows())
    utils = "lmms_eval.tasks.mme.utils"
    (folder / "pmod_ci_mme.yaml").write_text(textwrap.dedent(f"""\
        task: pmod_ci_mme
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            test: test.parquet
        test_split: test
        output_type: generate_until
        doc_to_visual: !function {utils}.mme_doc_to_visual
        doc_to_text: !function {utils}.mme_doc_to_text
        doc_to_target: answer
        process_results: !function {utils}.mme_process_results
        metric_list:
          - metric: mme_perception_score
            aggregation: !function {utils}.mme_aggregate_results
            higher_is_better: true
          - metric: mme_cognition_score
            aggregation: !function {utils}.mme_aggregate_results
            higher_is_better: true
        """) + GENERATION + SHORT_ANSWER)


def _pope_task(root, name, offset):
    folder = root / name
    folder.mkdir()
    rows = [{"question_id": str(i), "question": f"Is there a {word} in the image?", "answer": answer,
             "image": _image(i + offset, size_step=5 + offset)}
            for i, (word, answer) in enumerate([("cat", "yes"), ("dog", "no"), ("car", "yes"), ("tree", "no"),
                                                ("book", "yes")])]
    _write_parquet(folder / "test.parquet", rows)
    utils = "lmms_eval.tasks.pope.utils"
    metrics = "\n".join(f"  - metric: pope_{m}\n    aggregation: !function {utils}.pope_aggregate_{m}\n"
                        f"    higher_is_better: true" for m in ("accuracy", "precision", "recall", "f1_score"))
    (folder / f"{name}.yaml").write_text(textwrap.dedent(f"""\
        task: {name}
        dataset_path: parquet
        dataset_kwargs:
          data_files:
            {name.rsplit('_', 1)[1]}: test.parquet
        test_split: {name.rsplit('_', 1)[1]}
        output_type: generate_until
        doc_to_visual: !function {utils}.pope_doc_to_visual
        doc_to_text: !function {utils}.pope_doc_to_text
        doc_to_target: answer
        process_results: !function {utils}.pope_process_results
        """) + "metric_list:\n" + metrics + "\n" + GENERATION + SHORT_ANSWER)


@pytest.fixture(scope="module")
def fixture_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms-tasks")
    _mme_task(root)
    _pope_task(root, "pmod_ci_pope_a", 0)
    _pope_task(root, "pmod_ci_pope_b", 7)
    return root


@pytest.fixture(scope="module")
def checkpoint(tiny_models, tmp_path_factory):
    return build_tiny_llava_checkpoint(tiny_models, str(tmp_path_factory.mktemp("ckpt") / "tiny-pmod"), pmod=True)


def _env(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf"), TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled",
               PYTHON=sys.executable)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _run(command, env, cwd):
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command[:4]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def _answers(output_dir):
    """{(task, doc_id): answer} from lmms-eval's --log_samples files (the filtered answer the metric saw)."""
    answers = {}
    for path in Path(output_dir).rglob("*_samples_*.jsonl"):
        task = path.stem.split("_samples_", 1)[1]
        for line in path.read_text().splitlines():
            sample = json.loads(line)
            answers[(task, sample["doc_id"])] = sample["filtered_resps"]
    return answers


@pytest.fixture(scope="module")
def runs(fixture_tasks, checkpoint, tmp_path_factory):
    """The same evaluation through scripts/eval.sh (batch size 1) and lmms-eval directly (batch size 3)."""
    work = tmp_path_factory.mktemp("eval-runs")
    env = _env(work)
    script_out = work / "bs1"
    script = _run(["bash", str(REPO_ROOT / "scripts" / "eval.sh")],
                  dict(env, CKPT=checkpoint, TASKS=TASKS, NUM_GPUS="0", OUTPUT_DIR=str(script_out), BATCH_SIZE="1",
                       INCLUDE_PATH=str(fixture_tasks)), cwd=work)
    direct_out = work / "bs3"
    _run([sys.executable, "-m", "lmms_eval", "--model", "pmod_llava",
          "--model_args", f"pretrained={checkpoint},conv_template=vicuna_v1", "--device", "cpu",
          "--tasks", TASKS, "--include_path", str(fixture_tasks), "--batch_size", "3",
          "--log_samples", "--output_path", str(direct_out)], env, cwd=work)
    return {"script_out": script_out, "script_stdout": script.stdout, "direct_out": direct_out}


def test_plugin_is_registered_through_the_entry_point():
    entry_points = importlib.metadata.entry_points(group="lmms_eval.models")
    manifest = next(ep for ep in entry_points if ep.name == "pmod_llava").load()
    assert manifest.model_id == "pmod_llava"
    assert manifest.simple_class_path == "llava.eval.lmms_adapter.PmodLlava"


def test_batch_size_three_matches_batch_size_one_end_to_end(runs):
    single, batched = _answers(runs["script_out"]), _answers(runs["direct_out"])
    assert len(single) == 6 + 5 + 5
    assert batched == single


def test_results_use_real_metric_code(runs):
    results = json.loads(next(Path(runs["script_out"]).rglob("*_results.json")).read_text())["results"]
    answers = _answers(runs["script_out"])
    mme_answers = [answers[("pmod_ci_mme", doc_id)] for doc_id in range(6)]
    assert all(isinstance(answer, str) for answer in mme_answers)
    expected = lmms_mme_score(mme_answers)
    assert results["pmod_ci_mme"]["mme_perception_score,none"] == pytest.approx(expected)
    for task in ("pmod_ci_pope_a", "pmod_ci_pope_b"):
        assert 0.0 <= results[task]["pope_accuracy,none"] <= 1.0


def test_summary_table_and_efficiency_come_from_the_run(runs):
    stdout = runs["script_stdout"]
    summary_md = (runs["script_out"] / "summary.md").read_text()
    assert summary_md in stdout
    results = json.loads(next(Path(runs["script_out"]).rglob("*_results.json")).read_text())["results"]
    mme = results["pmod_ci_mme"]["mme_perception_score,none"]
    assert f"| pmod_ci_mme | mme_perception_score | {mme:.2f} |" in summary_md
    records = [json.loads(line) for line in (runs["script_out"] / "efficiency" / "efficiency_rank0.jsonl")
               .read_text().splitlines()]
    assert len(records) == 6 + 5 + 5
    efficiency = json.loads((runs["script_out"] / "efficiency_summary.json").read_text())
    assert efficiency["samples"] == len(records)
    assert efficiency["tflops_ratio"] < 1.0
    assert f"| Efficiency | KV cache, vision tokens % | {100 * efficiency['vision_kv_ratio']:.2f} |" in summary_md


def test_data_parallel_run_splits_the_documents_and_gives_the_same_answers(runs, fixture_tasks, checkpoint,
                                                                             tmp_path):
    """Two CPU ranks under torchrun (accelerate on a CPU-only host starts a single process)."""
    out = tmp_path / "ddp"
    env = dict(_env(tmp_path), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
          "-m", "lmms_eval", "--model", "pmod_llava", "--device", "cpu",
          "--model_args", f"pretrained={checkpoint},log_efficiency=True,efficiency_dir={out / 'efficiency'}",
          "--tasks", TASKS, "--include_path", str(fixture_tasks), "--batch_size", "2",
          "--log_samples", "--output_path", str(out)], env, cwd=tmp_path)
    assert _answers(out) == _answers(runs["script_out"])
    per_rank = [[json.loads(line) for line in (out / "efficiency" / f"efficiency_rank{rank}.jsonl")
                 .read_text().splitlines()] for rank in (0, 1)]
    assert all(per_rank)
    keys = [(record["task"], record["doc_id"]) for records in per_rank for record in records]
    assert len(keys) == len(set(keys)) == 6 + 5 + 5  # every document once, rank-padding copies not counted


def test_eval_script_rejects_bad_settings(tmp_path):
    env = _env(tmp_path)
    for override, message in [({"NUM_GPUS": "two"}, "NUM_GPUS"), ({"BATCH_SIZE": "0"}, "BATCH_SIZE"),
                              ({"CKPT": "a,b"}, "comma"), ({"LMMS_MODEL": "llava"}, "LMMS_MODEL")]:
        result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "eval.sh")],
                                env={**env, "NUM_GPUS": "0", "OUTPUT_DIR": str(tmp_path / "o"), **override},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr


def test_a_transformers_vlm_is_evaluated_by_pmod_hf_through_the_script(fixture_tasks, checkpoint, tmp_path):
    """scripts/eval.sh picks pmod_hf from the checkpoint's config: a p-MoD Qwen2.5-VL saved by pmod.hf."""
    from hf_vlm_testing import save_tiny_checkpoint, tiny_vlm, with_random_routers

    from llava.eval.model_choice import lmms_model_for
    from pmod.hf import apply_pmod

    qwen = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "pmod-qwen",
                                model=with_random_routers(apply_pmod(tiny_vlm("qwen2_5_vl"), zero_init=False)))
    assert (lmms_model_for(qwen), lmms_model_for(checkpoint)) == ("pmod_hf", "pmod_llava")
    out = tmp_path / "out"
    result = _run(["bash", str(REPO_ROOT / "scripts" / "eval.sh")],
                  dict(_env(tmp_path), CKPT=qwen, TASKS=TASKS, NUM_GPUS="0", OUTPUT_DIR=str(out), BATCH_SIZE="2",
                       INCLUDE_PATH=str(fixture_tasks)), cwd=tmp_path)
    assert "(pmod_hf)" in result.stderr
    assert len(_answers(out)) == 6 + 5 + 5
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]
    assert 0.0 <= results["pmod_ci_pope_a"]["pope_accuracy,none"] <= 1.0
    records = [json.loads(line) for line in (out / "efficiency" / "efficiency_rank0.jsonl").read_text().splitlines()]
    assert len(records) == 6 + 5 + 5 and all(record["vision_tokens"] > 0 for record in records)
    assert json.loads((out / "efficiency_summary.json").read_text())["tflops_ratio"] < 1.0
