"""scripts/demo_hf.sh at a tiny scale for Qwen2.5-VL: tiny checkpoint, dense and p-MoD fine-tuning through the family
script, reload with pmod.hf, lmms-eval through pmod_hf, report."""

from __future__ import annotations

import json

import pytest
from conftest import run_command

from llava.demo.synthetic import QUESTION_TYPES
from pmod.schedule import parse_schedule

pytest.importorskip("lmms_eval")
pytestmark = pytest.mark.slow


def test_the_demo_trains_reloads_and_evaluates_dense_and_pmod(tmp_path):
    result = run_command(["bash", "scripts/demo_hf.sh", "--scale", "tiny", "--families", "qwen2_5_vl", "--out",
                          tmp_path, "--set", "num_train=8", "--set", "num_eval=4", "--set", "steps=2"], timeout=900)
    report = json.loads((tmp_path / "report.json").read_text())["qwen2_5_vl"]
    dense, pmod = report["models"]["dense"], report["models"]["pmod"]
    for model in (dense, pmod):
        assert set(model["accuracy"]) == {*QUESTION_TYPES, "overall"}
        assert model["lmms_eval_score"] == pytest.approx(model["accuracy"]["overall"])
    n_vision = dense["mean_vision_tokens"]
    assert n_vision == pmod["mean_vision_tokens"] == 4  # a 56 px image: 2 x 2 merged Qwen tokens
    assert dense["mean_kept_vision_per_layer"] == [n_vision] * 6
    assert pmod["mean_kept_vision_per_layer"] == parse_schedule("shiftedcos_decay_0.85_0.15", 0.5, 6).keep_counts(4)
    assert pmod["mean_tflops"] < dense["mean_tflops"]
    assert "reloaded PmodQwen2_5_VLForConditionalGeneration with 4 routers" in result.stdout
    assert (tmp_path / "report.md").read_text() in result.stdout
    trained = json.loads((tmp_path / "checkpoints" / "qwen2_5_vl" / "pmod" / "config.json").read_text())
    assert trained["text_config"]["mod_target_layers"] == "shiftedcos_decay_0.85_0.15"
    assert "mod_target_layers" not in json.dumps(
        json.loads((tmp_path / "checkpoints" / "qwen2_5_vl" / "dense" / "config.json").read_text()))
