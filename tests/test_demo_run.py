"""The README's main command at its tiny scale: data, stage 1, stage 2 dense and p-MoD, lmms-eval, report,
figures."""

from __future__ import annotations

import json

import pytest
from conftest import run_command
from PIL import Image

from llava.demo.run import SCALES, scale_with_overrides
from llava.demo.synthetic import QUESTION_TYPES
from pmod.schedule import parse_schedule

pytest.importorskip("lmms_eval")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_command(["bash", "scripts/demo.sh", "--scale", "tiny", "--out", out], timeout=900)
    return out, result.stdout


def test_report_compares_dense_and_pmod(demo):
    out, stdout = demo
    report = json.loads((out / "report.json").read_text())
    dense, pmod = report["models"]["dense"], report["models"]["pmod"]
    for model in (dense, pmod):
        assert set(model["accuracy"]) == {*QUESTION_TYPES, "overall"}
        assert all(0.0 <= value <= 100.0 for value in model["accuracy"].values())
        assert model["lmms_eval_score"] == pytest.approx(model["accuracy"]["overall"])
        assert model["train_seconds"] > 0 and model["eval_seconds"] > 0
    scale = SCALES["tiny"]
    n_vision = (scale.image_size // 14) ** 2
    schedule = parse_schedule("shiftedcos_decay_0.85_0.15", 0.5, scale.llm_layers)
    assert pmod["mean_vision_tokens"] == dense["mean_vision_tokens"] == n_vision
    assert dense["mean_kept_vision_per_layer"] == [n_vision] * scale.llm_layers
    assert pmod["mean_kept_vision_per_layer"] == schedule.keep_counts(n_vision)
    assert pmod["mean_tflops"] < dense["mean_tflops"]
    assert pmod["mean_kv_cache_bytes"] < dense["mean_kv_cache_bytes"]
    markdown = (out / "report.md").read_text()
    assert markdown in stdout
    assert f"| overall accuracy (%) | 31 | {dense['accuracy']['overall']:.1f} | {pmod['accuracy']['overall']:.1f} |" \
        in markdown
    for stage in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert stage in stdout


def test_demo_trains_through_the_scripts_and_writes_figures(demo):
    out, _ = demo
    assert (out / "checkpoints" / "stage1" / "mm_projector.bin").is_file()
    pmod_config = json.loads((out / "checkpoints" / "pmod" / "config.json").read_text())
    assert pmod_config["model_type"] == "pmod_llava_llama"
    assert json.loads((out / "checkpoints" / "dense" / "config.json").read_text())["model_type"] == "llava_llama"
    assert "global batch 4 = 1 GPUs x 4 x 1 accumulation (python)" in (out / "logs" / "stage2_pmod.log").read_text()
    figures = json.loads((out / "report.json").read_text())["figures"]
    assert len(figures) == 2 * SCALES["tiny"].figure_images
    for figure in figures:
        with Image.open(out / figure) as png:
            assert int(png.text["Panels"]) >= 1


def test_scale_overrides_are_checked():
    assert scale_with_overrides("tiny", ["stage2_steps=7", "stage2_lr=0.5"]).stage2_steps == 7
    with pytest.raises(ValueError, match="KEY one of"):
        scale_with_overrides("tiny", ["steps=7"])
    with pytest.raises(ValueError, match="needs a int"):
        scale_with_overrides("tiny", ["batch=two"])


def test_compare_puts_reducers_and_pmod_side_by_side(demo, tmp_path):
    """scripts/compare.sh on the demo's checkpoints: a reducer at a reachable budget, one it cannot reach,
    the dense model and the p-MoD checkpoint, through eval.sh, into one table, JSON and plot."""
    from llava.demo.lmms_task import TASK_NAME

    out, _ = demo
    result_dir = tmp_path / "compare"
    run_command(["bash", "scripts/compare.sh", "--dense", out / "checkpoints" / "dense",
                 "--pmod", out / "checkpoints" / "pmod", "--tasks", TASK_NAME, "--include-path", out / "lmms_task",
                 "--methods", "fastv", "--budgets", "0.5,0.05", "--latency-repeats", "1", "--out", result_dir],
                timeout=900)
    data = json.loads((result_dir / "comparison.json").read_text())
    runs = {run["name"]: run for run in data["runs"]}
    assert list(runs) == ["dense", "fastv_k1_keep0.32", "p-MoD pmod"]
    assert [note.split(":")[0] for note in data["not_run"]] == ["fastv at 0.05"]
    dense, fastv, pmod = runs.values()
    assert dense["vision_share"] == 1.0 and dense["tflops_ratio"] == 1.0 and dense["prefill_ratio"] == 1.0
    assert fastv["reducer"] == "fastv_k1_keep0.32" and fastv["budget"] == 0.5
    assert abs(fastv["vision_share"] - 0.5) <= 1 / 16 and fastv["tflops_ratio"] < 1 and fastv["kv_ratio"] < 1
    assert pmod["vision_share"] < 1 and pmod["reducer"] is None
    for run in runs.values():
        assert set(run["scores"]) == {TASK_NAME} and run["prefill_ms"] > 0
    table = (result_dir / "comparison.md").read_text()
    assert "| fastv_k1_keep0.32 | 0.500 |" in table and "Not run: fastv at 0.05" in table
    with Image.open(result_dir / "accuracy_vs_tflops.png") as plot:
        assert plot.size == (900, 600) and len(plot.getcolors(1 << 16)) > 3
