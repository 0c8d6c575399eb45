"""LLaVA-style LoRA folders: a p-MoD LoRA run saved without merging loads with --model-base, merges with
`python -m llava.model.merge_lora` (final folder and an intermediate checkpoint-N), and gives the logits of
the model the run merged itself; LLaVA's own file formats (.bin adapter and non-LoRA trainables) load too."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from conftest import run_command, run_train
from PIL import Image
from safetensors.torch import load_file
from test_train_stages import stage2_flags

from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model import PmodLlavaLlamaForCausalLM
from llava.model.builder import load_pretrained_model
from llava.model.checkpoint_config import CheckpointConfigError

pytestmark = [pytest.mark.slow, pytest.mark.compat]
PMOD_FLAGS = dict(mod_target_layers="shiftedcos_decay_0.85_0.15", mod_router_factor=0.5,
                  mod_weight_norm="tanh_0.2_1", mod_bias_enabled=True, mod_special_init=False)


@pytest.fixture(scope="module")
def lora_run(tiny_models, tiny_dataset, tmp_path_factory):
    """Two steps of p-MoD LoRA, a checkpoint after each; the run saves the adapter and a merged model."""
    output_dir = tmp_path_factory.mktemp("pmod-lora") / "run"
    run_train(stage2_flags(tiny_models, tiny_dataset, output_dir, lora_enable=True, lora_r=4, lora_alpha=8,
                           lora_dropout=0.0, save_strategy="steps", save_steps=1, **PMOD_FLAGS))
    return output_dir


def logits(model_dir, model_base=None, dtype=torch.float32) -> torch.Tensor:
    tokenizer, model, image_processor, _ = load_pretrained_model(str(model_dir), model_base, dtype=dtype)
    assert isinstance(model, PmodLlavaLlamaForCausalLM)
    conversation = get_conv_template("vicuna_v1")
    conversation.append_message(conversation.roles[0], "<image>\nWhat color is the picture?")
    conversation.append_message(conversation.roles[1], None)
    ids = tokenizer_image_token(conversation.get_prompt(), tokenizer, return_tensors="pt")[None]
    image = Image.new("RGB", (48, 64), (30, 200, 30))
    with torch.no_grad():
        return model(input_ids=ids, images=process_images([image], image_processor, model.config)).logits


def test_the_adapter_folder_is_llava_style(lora_run):
    adapter = lora_run / "lora_adapter"
    for folder in (adapter, lora_run / "checkpoint-1"):
        names = {path.name for path in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
                "config.json"} <= names, folder
    assert json.loads((adapter / "config.json").read_text())["model_type"] == "pmod_llava_llama"
    trainables = load_file(adapter / "non_lora_trainables.safetensors")
    assert any(".router.router." in name for name in trainables) and any("mm_projector" in name for name in trainables)


def test_loading_with_model_base_gives_the_merged_models_logits(lora_run, tiny_models):
    merged = logits(lora_run)
    torch.testing.assert_close(logits(lora_run / "lora_adapter", tiny_models.llm), merged, atol=1e-5, rtol=1e-5)


def test_merge_lora_tool_on_the_final_folder_and_a_checkpoint(lora_run, tiny_models, tmp_path):
    merged = logits(lora_run)
    for source, name in ((lora_run / "lora_adapter", "final"), (lora_run / "checkpoint-2", "step2")):
        run_command([sys.executable, "-m", "llava.model.merge_lora", "--model-path", source, "--model-base",
                     tiny_models.llm, "--save-model-path", tmp_path / name, "--dtype", "float32"])
        assert (tmp_path / name / "tokenizer_config.json").is_file()
        torch.testing.assert_close(logits(tmp_path / name), merged, atol=1e-5, rtol=1e-5)
    earlier = logits(lora_run / "checkpoint-1", tiny_models.llm)
    assert not torch.allclose(earlier, merged, atol=1e-4), "checkpoint-1 must hold the weights after one step"


def test_llavas_own_file_formats_load(lora_run, tiny_models, tmp_path):
    """LLaVA writes adapter_model.bin and non_lora_trainables.bin (torch pickles) with the same key names."""
    llava_style = tmp_path / "llava-v1.5-7b-lora"
    shutil.copytree(lora_run / "lora_adapter", llava_style)
    for name in ("adapter_model", "non_lora_trainables"):
        torch.save(load_file(llava_style / f"{name}.safetensors"), llava_style / f"{name}.bin")
        (llava_style / f"{name}.safetensors").unlink()
    torch.testing.assert_close(logits(llava_style, tiny_models.llm), logits(lora_run), atol=1e-5, rtol=1e-5)


def test_the_base_comes_from_the_adapter_or_must_be_given(lora_run, tiny_models, tmp_path):
    adapter_config = json.loads((lora_run / "lora_adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_models.llm)
    torch.testing.assert_close(logits(lora_run / "lora_adapter"), logits(lora_run), atol=1e-5, rtol=1e-5)
    anonymous = tmp_path / "anonymous"
    shutil.copytree(lora_run / "lora_adapter", anonymous)
    (anonymous / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": None}))
    with pytest.raises(CheckpointConfigError, match="pass --model-base"):
        load_pretrained_model(str(anonymous))
    result = run_command([sys.executable, "-m", "llava.model.merge_lora", "--model-path", tiny_models.llm,
                          "--save-model-path", tmp_path / "x"], expect_success=False)
    assert result.returncode == 2 and "not a LoRA folder" in result.stderr
