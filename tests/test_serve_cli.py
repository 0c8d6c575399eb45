"""LLaVA's inference entry points: the chat CLI (scripted on standard input) and run_llava (one answer)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import REPO_ROOT, run_command, subprocess_env
from PIL import Image

from llava.eval.run_llava import answer, place_images

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def loaded(pmod_checkpoint):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(pmod_checkpoint, device="cpu")
    return tokenizer, model, image_processor


def test_place_images_follows_llava_rules():
    config = SimpleNamespace(mm_use_im_start_end=False)
    assert place_images("What is it?", 1, config) == "<image>\nWhat is it?"
    assert place_images("Compare <image-placeholder> and <image-placeholder>.", 2, config) == \
        "Compare <image> and <image>."
    assert place_images("<image>\nWhat is it?", 1, config) == "<image>\nWhat is it?"
    assert place_images("Hello", 0, config) == "Hello"
    assert place_images("Q", 1, SimpleNamespace(mm_use_im_start_end=True)) == "<im_start><image><im_end>\nQ"


def test_cli_answers_a_scripted_conversation_from_stdin(pmod_checkpoint, shapes_picture, loaded):
    tokenizer, model, image_processor = loaded
    picture = Image.open(shapes_picture)
    expected_first = answer(model, tokenizer, image_processor, "What color is the square?", [picture],
                            max_new_tokens=6)
    result = subprocess.run(
        [sys.executable, "-m", "llava.serve.cli", "--model-path", pmod_checkpoint, "--image-file", str(shapes_picture),
         "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"],
        input="What color is the square?\nAnd where is it?\n", cwd=REPO_ROOT, env=subprocess_env(),
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("USER: ") == 3  # two turns, then end of input
    assert result.stdout.count("ASSISTANT: ") == 2
    assert result.stdout.rstrip().endswith("exit...")
    first_reply = result.stdout.split("ASSISTANT: ", 1)[1].split("USER: ", 1)[0].strip()
    assert first_reply == expected_first


def test_run_llava_gives_the_in_process_answer_and_honours_the_placeholder(pmod_checkpoint, shapes_picture, loaded):
    tokenizer, model, image_processor = loaded
    picture = Image.open(shapes_picture)
    expected = answer(model, tokenizer, image_processor, "What is this?", [picture], max_new_tokens=5)
    result = run_command([sys.executable, "-m", "llava.eval.run_llava", "--model-path", pmod_checkpoint,
                          "--image-file", str(shapes_picture), "--query", "<image-placeholder>\nWhat is this?",
                          "--temperature", "0", "--max_new_tokens", "5", "--device", "cpu"])
    assert result.stdout.strip().splitlines()[-1] == expected if expected else result.stdout.strip() == ""


def test_run_llava_names_a_missing_image(pmod_checkpoint, tmp_path):
    result = run_command([sys.executable, "-m", "llava.eval.run_llava", "--model-path", pmod_checkpoint,
                          "--image-file", str(tmp_path / "missing.png"), "--query", "Q"], expect_success=False)
    assert result.returncode != 0 and "--image-file" in result.stderr and "missing.png" in result.stderr
