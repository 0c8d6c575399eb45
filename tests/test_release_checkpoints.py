"""Checkpoints and tokenizers as the LLaVA releases ship them load as they are, and answer like our own format.

LLaVA-1.5 / 1.6 releases say ``"model_type": "llava"`` (which transformers maps to its own LlavaConfig) and
ship a SentencePiece tokenizer without ``tokenizer.json``; their vision tower is a hub name. Here the files
are written exactly that way on tiny weights, and the hub tower comes from a local hub cache.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from conftest import run_command, subprocess_env
from PIL import Image
from pmod_testing import tiny_config_kwargs
from release_files import HUB_TOWER, release_config, write_hub_tower, write_release, write_sentencepiece_tokenizer

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.builder import load_pretrained_model
from llava.model.checkpoint_config import CheckpointConfigError, load_checkpoint_config
from llava.model.tokenizer import TokenizerLoadError, load_tokenizer

pytestmark = pytest.mark.compat
VOCAB = 400
QUESTION = "What color is the picture?"


@pytest.fixture(scope="module")
def hub_cache(tiny_models, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    write_hub_tower(cache, tiny_models.vision_tower)
    return cache


@pytest.fixture(autouse=True)
def offline_hub(hub_cache, monkeypatch):
    """In-process loads read the hub cache that holds the tiny tower under its hub name."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return write_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp-tokenizer"))


def reference_model(tiny_models, version: str) -> LlavaLlamaForCausalLM:
    """Our dense LLaVA on the tiny tower, its weights rounded to the release's dtype (the tower too for 1.6)."""
    anyres = version == "1.6"
    config = LlavaConfig(**tiny_config_kwargs(
        tiny_models.vision_tower, num_layers=4, vocab_size=VOCAB, mm_patch_merge_type="spatial_unpad" if anyres
        else "flat", image_aspect_ratio="anyres" if anyres else "pad",
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]] if anyres else None,
    ))
    torch.manual_seed(3)
    model = LlavaLlamaForCausalLM(config)
    model.get_model().vision_tower.load_pretrained_weights()
    if anyres:
        torch.nn.init.normal_(model.get_model().image_newline, std=0.5)
    dtype = torch.bfloat16 if anyres else torch.float16
    with torch.no_grad():
        for name, param in model.named_parameters():
            if anyres or "vision_tower" not in name:
                param.copy_(param.to(dtype).float())
    return model.eval()


@pytest.fixture(scope="module", params=["1.5", "1.6"])
def release(request, tiny_models, sp_tokenizer, hub_cache, tmp_path_factory):
    """(version, release folder, our-format folder with the same weights)."""
    version = request.param
    root = tmp_path_factory.mktemp(f"llava-v{version}")
    model = reference_model(tiny_models, version)
    ours = root / "ours"
    model.save_pretrained(ours)
    for item in sp_tokenizer.iterdir():
        shutil.copy(item, ours / item.name)
    folder = write_release(root / f"llava-v{version}-7b", model.state_dict(),
                           release_config(model.config.to_dict(), version), sp_tokenizer)
    return version, folder, ours


def image_batch(image_processor, config):
    image = Image.new("RGB", (90, 60), (200, 40, 40))
    image.paste((20, 20, 220), (10, 10, 50, 40))
    return image, process_images([image], image_processor, config)


def test_release_config_loads_as_our_llava_class(release):
    version, folder, _ = release
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llava"
    config = load_checkpoint_config(str(folder))
    assert isinstance(config, LlavaConfig) and config.model_type == "llava_llama"
    assert config.mm_vision_tower == HUB_TOWER
    if version == "1.6":
        assert config.image_grid_pinpoints[0] == [56, 112] and config.mm_patch_merge_type == "spatial_unpad"


def test_release_gives_the_logits_of_our_own_format(release):
    version, folder, ours = release
    tok_r, model_r, proc_r, context_r = load_pretrained_model(str(folder), dtype=torch.float32)
    tok_o, model_o, proc_o, _ = load_pretrained_model(str(ours), dtype=torch.float32)
    assert type(model_r) is LlavaLlamaForCausalLM
    assert context_r == 4096
    for name, value in model_o.state_dict().items():
        torch.testing.assert_close(model_r.state_dict()[name], value, atol=0, rtol=0, msg=name)
    image, pixels = image_batch(proc_r, model_r.config)
    prompt = f"USER: <image>\n{QUESTION} ASSISTANT:"
    ids = tokenizer_image_token(prompt, tok_r, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    assert ids.tolist() == tokenizer_image_token(prompt, tok_o, IMAGE_TOKEN_INDEX, return_tensors="pt")[None].tolist()
    with torch.no_grad():
        logits_r = model_r(input_ids=ids, images=pixels, image_sizes=[image.size]).logits
        logits_o = model_o(input_ids=ids, images=process_images([image], proc_o, model_o.config),
                           image_sizes=[image.size]).logits
    torch.testing.assert_close(logits_r, logits_o, atol=1e-5, rtol=0)


def test_sentencepiece_tokenizer_reads_like_the_sentencepiece_library(sp_tokenizer):
    import sentencepiece as spm

    assert not (sp_tokenizer / "tokenizer.json").exists()
    tokenizer = load_tokenizer(str(sp_tokenizer))
    processor = spm.SentencePieceProcessor(model_file=str(sp_tokenizer / "tokenizer.model"))
    for text in ("A chat between a curious user and an artificial intelligence assistant.",
                 "USER: What is in the image? ASSISTANT: A red circle on 12 blue squares.</s>"):
        pieces = text.split("</s>")
        expected = [processor.bos_id()] + processor.encode(pieces[0])
        if len(pieces) > 1:
            expected.append(processor.eos_id())
        assert tokenizer(text).input_ids == expected


def test_run_llava_and_the_chat_cli_answer_from_a_release(release, hub_cache, tmp_path):
    version, folder, ours = release
    image = tmp_path / "picture.png"
    Image.new("RGB", (90, 60), (200, 40, 40)).save(image)
    env = subprocess_env(HF_HUB_CACHE=hub_cache)
    answers = []
    for checkpoint in (folder, ours):
        result = run_command([sys.executable, "-m", "llava.eval.run_llava", "--model-path", checkpoint,
                              "--image-file", image, "--query", QUESTION, "--temperature", "0",
                              "--conv-mode", "vicuna_v1",
                              "--max_new_tokens", "6", "--device", "cpu"], env=env)
        answers.append(result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "")
    assert answers[0] and answers[0] == answers[1]
    chat = subprocess.run(
        [sys.executable, "-m", "llava.serve.cli", "--model-path", str(folder), "--image-file", str(image),
         "--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"],
        input=f"{QUESTION}\n", capture_output=True, text=True, env=env, timeout=300,
    )
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "ASSISTANT:" in chat.stdout


def test_the_lmms_eval_plugin_loads_a_release(release):
    pytest.importorskip("lmms_eval")
    from llava.eval.lmms_adapter import PmodLlava

    _, folder, _ = release
    lm = PmodLlava(pretrained=str(folder), device="cpu")
    assert type(lm.model) is LlavaLlamaForCausalLM
    assert lm.tokenizer("USER:").input_ids[0] == 1


def test_train_py_starts_from_a_sentencepiece_llm(tiny_models, tiny_dataset, sp_tokenizer, tmp_path):
    """Stage 2 from a Vicuna-style folder: Llama weights + tokenizer.model only; labels follow vicuna_v1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = tmp_path / "vicuna-tiny"
    config = LlamaConfig(**{k: v for k, v in tiny_config_kwargs(None, num_layers=2, vocab_size=VOCAB).items()
                            if k != "attn_implementation"})
    LlamaForCausalLM(config).save_pretrained(llm)
    for item in sp_tokenizer.iterdir():
        shutil.copy(item, llm / item.name)
    output = tmp_path / "out"
    run_command([sys.executable, "-m", "llava.train.train", "--model_name_or_path", llm, "--version", "v1",
                 "--data_path", tiny_dataset.instruct_json, "--image_folder", tiny_dataset.image_folder,
                 "--vision_tower", tiny_models.vision_tower, "--mm_projector_type", "mlp2x_gelu",
                 "--mm_vision_select_layer", "-2", "--image_aspect_ratio", "pad", "--output_dir", output,
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--model_max_length", "256",
                 "--learning_rate", "1e-3", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True",
                 "--dataloader_num_workers", "0", "--bf16", "False"])
    tokenizer, model, _, _ = load_pretrained_model(str(output))
    text = "USER: What color is it? ASSISTANT: red"
    assert tokenizer(text).input_ids == load_tokenizer(str(llm))(text).input_ids
    assert model.config.vocab_size == VOCAB


def test_vicuna_v1_labels_with_a_sentencepiece_tokenizer(sp_tokenizer):
    """The loss covers each answer and its </s> exactly (the official rule), with Llama-style pieces."""
    from llava.train.preprocess import preprocess

    tokenizer = load_tokenizer(str(sp_tokenizer))
    tokenizer.pad_token = tokenizer.unk_token
    turns = [{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "It is red."},
             {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "A circle, 12 times."}]
    sample = preprocess(turns, tokenizer, "vicuna_v1", has_image=True)
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    assert [tokenizer.decode(run) for run in runs] == ["It is red.</s>", "A circle, 12 times.</s>"]


def test_loading_errors_name_the_folder_and_what_is_wrong(tmp_path, release):
    _, folder, ours = release
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(ours, no_tokenizer)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(TokenizerLoadError, match=f"no tokenizer could be loaded from {no_tokenizer}"):
        load_pretrained_model(str(no_tokenizer))

    hf_native = tmp_path / "llava-hf"
    hf_native.mkdir()
    (hf_native / "config.json").write_text(json.dumps({
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000,
        "text_config": {"model_type": "llama"}, "vision_config": {"model_type": "clip_vision_model"}}))
    with pytest.raises(CheckpointConfigError, match="transformers-native LLaVA checkpoint.*use it through pmod.hf"):
        load_pretrained_model(str(hf_native))

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no_such_model", "hidden_size": 8}))
    with pytest.raises(CheckpointConfigError, match=f"{unknown}: model_type 'no_such_model' is neither"):
        load_pretrained_model(str(unknown))

    sliding = json.loads((folder / "config.json").read_text())
    sliding.update(model_type="llava_mistral", architectures=["LlavaMistralForCausalLM"], sliding_window=4096)
    with pytest.raises(CheckpointConfigError, match="sliding-window attention"):
        from llava.model.checkpoint_config import released_llava_config

        released_llava_config(sliding, "mistral-release")
    mistral = dict(sliding, sliding_window=None)
    assert released_llava_config(mistral, "mistral-release").model_type == "llava_llama"

