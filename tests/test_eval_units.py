"""Evaluation helpers without a model: kwargs planning, stop strings, batching, prompts, summary table."""

import json

import pytest

from llava.eval.batching import kwargs_key, plan_batches, restore_order
from llava.eval.efficiency import load_records, summarize_records
from llava.eval.generation import DEFAULT_MAX_NEW_TOKENS, plan_generation, truncate_at_stop_strings
from llava.eval.prompting import build_prompt, with_image_tokens
from llava.eval.summarize import main as summarize_main
from llava.eval.summarize import summarize


def test_greedy_plan_drops_non_generate_and_sampling_kwargs():
    plan = plan_generation({"max_new_tokens": "16", "temperature": 0, "top_p": 0, "num_beams": 1,
                            "do_sample": False, "until": ["ASSISTANT:", ""], "image_aspect_ratio": "original"})
    assert plan.generate_kwargs == {"max_new_tokens": 16, "num_beams": 1, "do_sample": False}
    assert plan.stop_strings == ["ASSISTANT:"]


def test_sampling_plan_keeps_temperature_and_default_length():
    plan = plan_generation({"temperature": 0.7, "top_p": 0.9, "until": "\n\n"})
    assert plan.generate_kwargs == {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "num_beams": 1, "do_sample": True,
                                    "temperature": 0.7, "top_p": 0.9}
    assert plan.stop_strings == ["\n\n"]


def test_bad_until_is_rejected_with_its_name():
    with pytest.raises(ValueError, match="until"):
        plan_generation({"until": 3})


def test_truncate_cuts_at_earliest_stop_string():
    assert truncate_at_stop_strings("yes\n\nUSER: more", ["USER:", "\n\n"]) == "yes"
    assert truncate_at_stop_strings("no stop here", ["ASSISTANT:"]) == "no stop here"
    assert truncate_at_stop_strings("abc", []) == "abc"


def test_batches_group_by_key_sort_longest_first_and_restore_order():
    items = [("a", 3), ("b", 5), ("a", 7), ("a", 1), ("b", 2)]
    batches = list(plan_batches(items, 2, group_key=lambda it: it[0], length=lambda it: it[1]))
    assert [[index for index, _ in batch] for batch in batches] == [[2, 0], [3], [1, 4]]
    answered = [(index, item[1] * 10) for batch in batches for index, item in batch]
    assert restore_order(len(items), answered) == [30, 50, 70, 10, 20]


def test_restore_order_names_missing_requests():
    with pytest.raises(RuntimeError, match=r"\[1\]"):
        restore_order(2, [(0, "x")])
    with pytest.raises(ValueError, match="batch_size"):
        list(plan_batches([1], 0, group_key=lambda x: 0, length=lambda x: 0))


def test_kwargs_key_ignores_dict_order():
    assert kwargs_key({"a": 1, "until": ["x"]}) == kwargs_key({"until": ["x"], "a": 1})
    assert kwargs_key({"a": 1}) != kwargs_key({"a": 2})


def test_prompt_puts_image_tokens_before_question_in_vicuna_template():
    assert with_image_tokens("Q?", 2) == "<image> <image>\nQ?"
    assert with_image_tokens("<image>\nQ?", 1) == "<image>\nQ?"
    assert with_image_tokens("Q?", 0) == "Q?"
    prompt = build_prompt("What is it?", 1, "vicuna_v1")
    assert prompt.endswith("USER: <image>\nWhat is it? ASSISTANT:")
    assert prompt.startswith("A chat between a curious user")


PAPER_LLAVA_15 = {  # LLaVA-v1.5-7B row of the paper's Tables 1 and 2, in lmms-eval's units
    "seedbench": {"seed_image,none": 0.662}, "realworldqa": {"exact_match,none": 0.556},
    "mme": {"mme_perception_score,none": 1506.8, "mme_cognition_score,none": 300.0},
    "mmbench_en_dev": {"gpt_eval_score,none": 64.1},
    "pope_adv": {"pope_f1_score,none": 0.859}, "pope_pop": {"pope_f1_score,none": 0.859},
    "pope_random": {"pope_f1_score,none": 0.859},
    "gqa": {"exact_match,none": 0.619}, "ai2d": {"exact_match,flexible-extract": 0.552},
    "docvqa_val": {"anls,none": 0.281}, "chartqa": {"relaxed_overall,none": 0.182},
    "textvqa_val": {"exact_match,none": 0.460}, "infovqa_val": {"anls,none": 0.258},
    "ok_vqa_val2014": {"exact_match,none": 0.534}, "mmmu_val": {"mmmu_acc,none": 0.366},
    "scienceqa_img": {"exact_match,none": 0.697},
}


def _table_rows(table):
    rows = {}
    for line in table.splitlines()[2:]:
        benchmark, metric, score = [cell.strip() for cell in line.strip("|").split("|")]
        rows[(benchmark, metric)] = float(score)
    return rows


def test_summary_reproduces_paper_units_and_averages(tmp_path):
    run = tmp_path / "pmod_llava" / "2026-01-01T00-00-00_results.json"
    run.parent.mkdir()
    run.write_text(json.dumps({"results": {**PAPER_LLAVA_15, "extra_task": {"acc,none": 0.25, "alias": "x"}}}))
    rows = _table_rows(summarize(str(tmp_path)))
    assert rows[("MME", "mme_perception_score")] == 1506.8
    assert rows[("SEED", "seed_image")] == 66.2
    assert rows[("POPE", "pope_f1_score")] == 85.9
    assert rows[("MMB", "gpt_eval_score")] == 64.1
    assert round(rows[("AVG Table 1", "mean %")], 1) == 66.3  # the paper's value
    assert round(rows[("AVG Table 2", "mean %")], 1) == 39.7  # the paper's value
    assert rows[("extra_task", "acc")] == 0.25
    assert (tmp_path / "summary.md").read_text().startswith("| benchmark | metric | score |")


def test_summary_skips_incomplete_averages_and_newest_run_wins(tmp_path):
    old, new = tmp_path / "a_results.json", tmp_path / "b_results.json"
    old.write_text(json.dumps({"results": {"gqa": {"exact_match,none": 0.1}}}))
    new.write_text(json.dumps({"results": {"gqa": {"exact_match,none": 0.5},
                                           "mmbench_en_dev_static": {"gpt_eval_score,none": 60.0}}}))
    import os
    os.utime(old, (1, 1))
    rows = _table_rows(summarize(str(tmp_path)))
    assert rows[("GQA", "exact_match")] == 50.0
    assert rows[("MMB", "gpt_eval_score")] == 60.0
    assert not any(benchmark.startswith("AVG") for benchmark, _ in rows)


def test_summary_cli_reports_missing_results(tmp_path, capsys):
    assert summarize_main([str(tmp_path)]) == 1
    assert "no lmms-eval" in capsys.readouterr().err


def _record(tflops, dense, kv, dense_kv, vision_ratio):
    return {"text_tokens": 10, "vision_tokens": 20, "generated_tokens": 3, "tflops": tflops, "dense_tflops": dense,
            "kv_cache_bytes": kv, "dense_kv_cache_bytes": dense_kv, "vision_kv_ratio": vision_ratio}


def test_efficiency_summary_means_and_ratios(tmp_path):
    records = [_record(1.0, 2.0, 10, 20, 0.5), _record(3.0, 4.0, 30, 40, 0.6)]
    summary = summarize_records(records)
    assert summary["samples"] == 2
    assert summary["mean_tflops"] == 2.0 and summary["mean_dense_tflops"] == 3.0
    assert summary["tflops_ratio"] == pytest.approx(4.0 / 6.0)
    assert summary["kv_cache_ratio"] == pytest.approx(40 / 60)
    assert summary["vision_kv_ratio"] == pytest.approx(0.55)
    folder = tmp_path / "efficiency"
    folder.mkdir()
    (folder / "efficiency_rank0.jsonl").write_text(json.dumps(records[0]) + "\n")
    (folder / "efficiency_rank1.jsonl").write_text(json.dumps(records[1]) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"efficiency_rank1.jsonl line 2"):
        load_records(str(tmp_path))
