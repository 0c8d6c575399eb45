"""LLaVA's inference surface: `eval_model(args)`, images from paths / URLs / base64, the conversation template
taken from the checkpoint, 8/4-bit flags, and one-line errors for bad input in the CLIs."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import shutil
import sys
import threading
import types

import pytest
import torch
from conftest import run_command
from PIL import Image

from llava.eval.run_llava import answer, eval_model
from llava.model.builder import load_pretrained_model
from llava.model.quantization import FULL_PRECISION_MODULES, QuantizationUnavailable, bnb_config
from llava.serve.common import InputError, default_conv_mode, load_image

pytestmark = pytest.mark.compat


@pytest.fixture
def served(shapes_picture):
    """The picture on a local HTTP server (the URL path of load_image)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(shapes_picture.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{shapes_picture.name}"
    server.shutdown()


def test_images_come_from_paths_urls_and_base64(shapes_picture, served, tmp_path):
    expected = Image.open(shapes_picture).convert("RGB").tobytes()
    encoded = base64.b64encode(shapes_picture.read_bytes()).decode()
    for source in (str(shapes_picture), served, encoded, f"data:image/png;base64,{encoded}"):
        assert load_image(source).tobytes() == expected, source[:40]
    with pytest.raises(InputError, match="--image-file .*missing.png: no such file"):
        load_image(str(tmp_path / "missing.png"))
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    with pytest.raises(InputError, match="broken.png: is not a readable image"):
        load_image(str(broken))


def test_eval_model_takes_llavas_args_object(pmod_checkpoint, shapes_picture, capsys):
    args = type("Args", (), {
        "model_path": pmod_checkpoint, "model_base": None, "model_name": "pmod-tiny", "query": "What is this?",
        "conv_mode": None, "image_file": str(shapes_picture), "sep": ",", "temperature": 0, "top_p": None,
        "num_beams": 1, "max_new_tokens": 5, "device": "cpu",
    })()
    reply = eval_model(args)
    assert capsys.readouterr().out.strip().splitlines()[-1] == reply
    tokenizer, model, image_processor, _ = load_pretrained_model(pmod_checkpoint)
    image = Image.open(shapes_picture).convert("RGB")
    assert reply == answer(model, tokenizer, image_processor, "What is this?", [image],
                           "vicuna_v1", max_new_tokens=5)


def test_the_template_comes_from_the_checkpoint_then_its_name():
    model = types.SimpleNamespace(config=types.SimpleNamespace(conv_template="llava_v1"))
    assert default_conv_mode(model, "/ckpt/anything") == "llava_v1"
    bare = types.SimpleNamespace(config=types.SimpleNamespace())
    assert default_conv_mode(bare, "/ckpt/llava-v1.5-7b") == "llava_v1"
    assert default_conv_mode(bare, "/ckpt/p-MoD-LLaVA-NeXT-7B") == "vicuna_v1"
    assert default_conv_mode(bare, "/ckpt/llava-v1.6-mistral-7b") == "vicuna_v1"
    trained_plain = types.SimpleNamespace(config=types.SimpleNamespace(conv_template="plain"))
    assert default_conv_mode(trained_plain, "/ckpt/stage1") == "vicuna_v1"


def test_8_and_4_bit_keep_routers_projector_tower_and_head_in_full_precision(monkeypatch):
    with pytest.raises(QuantizationUnavailable, match="--load-4bit needs a CUDA device"):
        bnb_config(4, torch.float16, "--load-4bit")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(QuantizationUnavailable, match="pip install bitsandbytes"):
        bnb_config(8, torch.float16, "--load-8bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    config = bnb_config(4, torch.float16, "--load-4bit")
    assert config.load_in_4bit and not config.load_in_8bit
    assert set(config.llm_int8_skip_modules) == set(FULL_PRECISION_MODULES) == {
        "router", "mm_projector", "vision_tower", "lm_head"}


@pytest.mark.parametrize("case", ["missing model", "no tokenizer", "unreadable image", "4-bit on CPU"])
def test_cli_errors_are_one_line_naming_the_input(case, pmod_checkpoint, shapes_picture, tmp_path):
    model, image, extra = pmod_checkpoint, str(shapes_picture), []
    if case == "missing model":
        model, expected = str(tmp_path / "no-such-ckpt"), "no-such-ckpt: no such folder"
    elif case == "no tokenizer":
        model = tmp_path / "no-tokenizer"
        shutil.copytree(pmod_checkpoint, model)
        for item in model.glob("*"):
            if item.name.startswith(("tokenizer", "special_tokens")):
                item.unlink()
        expected = f"no tokenizer could be loaded from {model}"
    elif case == "unreadable image":
        image = tmp_path / "broken.jpg"
        image.write_bytes(b"\x00" * 10)
        expected = "broken.jpg: is not a readable image"
    else:
        extra, expected = ["--load-4bit"], "--load-4bit needs a CUDA device"
    for module in ("llava.eval.run_llava", "llava.serve.cli"):
        command = [sys.executable, "-m", module, "--model-path", model, "--image-file", image, "--device", "cpu",
                   *extra] + (["--query", "Q"] if module.endswith("run_llava") else [])
        result = run_command(command, expect_success=False)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and expected in result.stderr.strip().splitlines()[-1], module


def test_training_records_the_template_in_the_config(tiny_models, tiny_dataset, tmp_path):
    from llava.train.train import build_model, parse_args, validate_args

    argv = ["--model_name_or_path", tiny_models.llm, "--vision_tower", tiny_models.vision_tower,
            "--data_path", tiny_dataset.instruct_json, "--image_folder", tiny_dataset.image_folder,
            "--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu", "True", "--version", "llava_v1"]
    model_args, data_args, training_args = parse_args(argv)
    model = build_model(model_args, data_args, training_args, torch.float32,
                        validate_args(model_args, data_args, training_args))
    assert model.config.conv_template == "llava_v1"
    model.config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["conv_template"] == "llava_v1"


def test_base64_of_a_non_image_is_named(tmp_path):
    garbage = base64.b64encode(io.BytesIO(b"\x01" * 300).getvalue()).decode()
    with pytest.raises(InputError, match="could not be downloaded or decoded"):
        load_image(garbage)
