"""Batch answering of a question file (LLaVA's model_vqa_loader): batches equal batch 1, chunks cover the file,
an interrupted run resumes without losing or repeating answers, bad input names the line."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import run_command
from PIL import Image

from llava.eval.model_vqa_loader import get_chunk

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def setup(pmod_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    checkpoint = pmod_checkpoint
    images = root / "images"
    images.mkdir()
    questions = []
    for index in range(5):
        Image.new("RGB", (40 + 9 * index, 60 - 5 * index), (40 * index, 200 - 30 * index, 90)).save(
            images / f"{index}.png")
        questions.append({"question_id": f"q{index}", "image": f"{index}.png",
                          "text": "What color is it?" + " Answer briefly." * (index % 3), "category": "color"})
    questions.append({"question_id": "q-text", "text": "Name a color.", "category": "text"})
    question_file = root / "questions.jsonl"
    question_file.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return checkpoint, images, question_file


def answer(setup, answers_file, *extra, expect_success=True):
    checkpoint, images, question_file = setup
    return run_command([sys.executable, "-m", "llava.eval.model_vqa_loader", "--model-path", checkpoint,
                        "--image-folder", images, "--question-file", question_file, "--answers-file", answers_file,
                        "--temperature", "0", "--max_new_tokens", "4", "--device", "cpu", *extra],
                       expect_success=expect_success)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_batches_chunks_and_resume(setup, tmp_path):
    answer(setup, tmp_path / "one.jsonl", "--batch-size", "1")
    single = read(tmp_path / "one.jsonl")
    assert [a["question_id"] for a in single] == ["q0", "q1", "q2", "q3", "q4", "q-text"]
    assert set(single[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert single[0]["model_id"] == "pmod"
    texts = {a["question_id"]: a["text"] for a in single}

    answer(setup, tmp_path / "three.jsonl", "--batch-size", "3")
    assert {a["question_id"]: a["text"] for a in read(tmp_path / "three.jsonl")} == texts

    for chunk in range(2):
        answer(setup, tmp_path / "chunks.jsonl", "--num-chunks", "2", "--chunk-idx", str(chunk), "--batch-size", "2")
    assert {a["question_id"]: a["text"] for a in read(tmp_path / "chunks.jsonl")} == texts

    resumed = tmp_path / "resumed.jsonl"
    kept = (tmp_path / "one.jsonl").read_text().splitlines()[:2]
    resumed.write_text("\n".join(kept) + "\n" + '{"question_id": "q2", "te')  # killed while writing q2
    result = answer(setup, resumed, "--batch-size", "2")
    lines = resumed.read_text().splitlines()
    assert lines[:2] == kept, "answers already written are kept as they were"
    assert [json.loads(line)["question_id"] for line in lines] == ["q0", "q1", "q2", "q3", "q4", "q-text"]
    assert {a["question_id"]: a["text"] for a in read(resumed)} == texts
    assert "answering" in result.stderr
    again = answer(setup, resumed)
    assert "already in" in again.stdout and resumed.read_text().splitlines() == lines


def test_bad_question_file_names_the_line(setup, tmp_path):
    checkpoint, images, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "text": "ok"}\n{"question_id": 2\n')
    result = run_command([sys.executable, "-m", "llava.eval.model_vqa_loader", "--model-path", checkpoint,
                          "--question-file", bad, "--answers-file", tmp_path / "a.jsonl"], expect_success=False)
    assert result.returncode == 1 and "bad.jsonl, line 2: not JSON" in result.stderr


def test_chunks_split_like_llava():
    items = list(range(10))
    assert [get_chunk(items, 3, k) for k in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert sum((get_chunk(items, 4, k) for k in range(4)), []) == items
