"""Fine-tuning transformers-native VLMs with p-MoD (llava.train.train_hf and scripts/finetune_pmod_<family>.sh):
labels cover exactly the assistant turns of the model's own chat template, and a few steps through the real
script train the language model and the routers and save a checkpoint pmod.hf reloads."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch
from conftest import run_command, tiny_script_env
from hf_vlm_testing import Sample, save_tiny_checkpoint, tiny_processor, tiny_vlm, vlm_inputs
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from llava.constants import IGNORE_INDEX
from llava.train.hf_data import ChatCollator, ChatDataset
from pmod.hf import apply_pmod, from_pretrained

pytestmark = pytest.mark.slow
SCRIPTS = {"llava": "finetune_pmod_llava_hf.sh", "llava_onevision": "finetune_pmod_llava_onevision.sh",
           "qwen2_5_vl": "finetune_pmod_qwen2_5vl.sh"}


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_labels_are_the_assistant_turns_and_follow_image_expansion(family, tmp_path):
    processor = tiny_processor(family)
    processor.tokenizer.padding_side = "right"
    Image.new("RGB", (70, 50), (200, 30, 30)).save(tmp_path / "red.png")
    records = [{"id": "a", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "Is it big?"}, {"from": "gpt", "value": "It is small."}]},
        {"id": "b", "conversations": [{"from": "human", "value": "Name a color."}, {"from": "gpt", "value": "blue"}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    dataset = ChatDataset(str(tmp_path / "data.json"), str(tmp_path), processor)
    batch = ChatCollator(processor, {508, 509})([dataset[0], dataset[1]])
    end = "</s>" if family == "llava" else "<|im_end|>"
    for row, replies in enumerate([["It is red.", "It is small."], ["blue"]]):
        labels = batch["labels"][row]
        runs, current = [], []
        for token, label in zip(batch["input_ids"][row].tolist(), labels.tolist()):
            if label != IGNORE_INDEX:
                assert label == token
                current.append(token)
            elif current:
                runs, current = runs + [current], []
        runs += [current] if current else []
        decoded = [processor.tokenizer.decode(run).strip() for run in runs]
        assert decoded == [f"{reply}{end}" for reply in replies] or \
            decoded == [f"{reply}{end}\n".strip() for reply in replies], decoded
    image_tokens = (batch["input_ids"][0] == 508).sum()
    assert image_tokens > 1 and (batch["labels"][0][batch["input_ids"][0] == 508] == IGNORE_INDEX).all()


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_a_blank_image_row_changes_neither_loss_nor_gradients(family, tmp_path):
    processor = tiny_processor(family)
    processor.tokenizer.padding_side = "right"
    records = [{"id": str(n), "conversations": [{"from": "human", "value": f"Name color {n}."},
                                                {"from": "gpt", "value": "blue" if n else "a dark red"}]}
               for n in range(2)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    dataset = ChatDataset(str(tmp_path / "data.json"), None, processor)
    model = apply_pmod(tiny_vlm(family), schedule="shiftedcos_decay_0.85_0.15", zero_init=False)

    def loss_and_grads(image_in_every_batch):
        batch = ChatCollator(processor, {508, 509}, image_in_every_batch)([dataset[0], dataset[1]])
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return batch, loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, loss, grads = loss_and_grads(False)
    padded, padded_loss, padded_grads = loss_and_grads(True)
    assert "pixel_values" not in plain and padded["input_ids"].shape[0] == 3 and (padded["input_ids"] == 508).any()
    torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=1e-6)
    assert any(".router." in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(padded_grads[name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("lora", [False, True])
def test_the_vision_tower_is_frozen_and_projector_llm_and_routers_train(family, lora):
    from types import SimpleNamespace

    from llava.train.train_hf import configure_trainable

    args = SimpleNamespace(lora_enable=lora, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none")
    model = configure_trainable(apply_pmod(tiny_vlm(family)), args)
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    projector = "merger" if family == "qwen2_5_vl" else "multi_modal_projector"
    tower = [name for name, _ in model.named_parameters()
             if ("visual." in name or "vision_tower." in name) and projector not in name]
    assert tower and not trainable & set(tower)
    assert any(projector in name for name in trainable) and any(".router." in name for name in trainable)
    language = [name for name in trainable if "language_model" in name and ".router." not in name]
    assert language and all(("lora_" in name) == lora for name in language)


def test_a_bad_sample_is_named(tmp_path):
    processor = tiny_processor("llava")
    (tmp_path / "data.json").write_text(json.dumps([{"id": "x", "image": "missing.png", "conversations": [
        {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}]))
    with pytest.raises(ValueError, match=r"sample 0 \(x\): cannot read image .*missing.png"):
        ChatDataset(str(tmp_path / "data.json"), str(tmp_path), processor)[0]


@pytest.mark.parametrize("family", sorted(SCRIPTS))
def test_the_family_script_trains_pmod_and_saves_a_reloadable_checkpoint(family, tiny_models, tiny_dataset,
                                                                          tmp_path):
    checkpoint = save_tiny_checkpoint(family, tmp_path / "base")
    output = tmp_path / "out"
    env = tiny_script_env(tiny_models, tiny_dataset, output, MODEL=checkpoint, DATA_PATH=tiny_dataset.instruct_json,
                          GRADIENT_CHECKPOINTING="True", MOD_ROUTER_FACTOR="0.5", MOD_SPECIAL_INIT="True")
    result = run_command(["bash", f"scripts/{SCRIPTS[family]}"], env=env, timeout=600)
    assert "global batch 4 = 1 GPUs x 2 x 2 accumulation (python)" in result.stderr
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    model = from_pretrained(output)
    assert type(model).__name__.startswith("Pmod")
    routers = {name: value for name, value in load_file(output / "model.safetensors").items() if ".router." in name}
    assert routers and any(value.abs().sum() > 0 for value in routers.values()), "zero-initialised routers trained"
    config = json.loads((output / "config.json").read_text())
    text_config = config.get("text_config", config)
    assert text_config["mod_target_layers"] == "shiftedcos_decay_0.85_0.15" and text_config["mod_special_init"]


def test_lora_fine_tuning_saves_the_merged_model(tiny_models, tiny_dataset, tmp_path):
    checkpoint = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "base")
    output = tmp_path / "lora"
    run_command([sys.executable, "-m", "llava.train.train_hf", "--model_name_or_path", checkpoint,
                 "--data_path", tiny_dataset.instruct_json, "--image_folder", tiny_dataset.image_folder,
                 "--output_dir", output, "--mod_target_layers", "shiftedcos_decay_0.85_0.15", "--lora_enable", "True",
                 "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "2", "--per_device_train_batch_size", "2",
                 "--learning_rate", "1e-3", "--report_to", "none", "--use_cpu", "True", "--save_strategy", "no",
                 "--bf16", "False", "--dataloader_num_workers", "0"])
    weights = load_file(output / "model.safetensors")
    assert not any("lora_" in name for name in weights) and any(".router." in name for name in weights)
    model = from_pretrained(output).eval()
    assert torch.isfinite(next(model.parameters())).all()


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="needs the deepspeed launcher (extra 'train')")
@pytest.mark.parametrize("zero_config, lora, port", [("scripts/zero3.json", "False", 29622),
                                                     ("scripts/zero2.json", "True", 29623)])
def test_deepspeed_two_ranks_train_and_save_full_weights(zero_config, lora, port, tiny_models, tiny_dataset, tmp_path):
    checkpoint = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "base")
    output = tmp_path / "ds"
    env = tiny_script_env(tiny_models, tiny_dataset, output, MODEL=checkpoint, DATA_PATH=tiny_dataset.instruct_json,
                          LAUNCHER="deepspeed", NUM_GPUS=2, DS_CONFIG=zero_config, PER_DEVICE_BATCH=1,
                          GRADIENT_CHECKPOINTING="True", OMP_NUM_THREADS=1, MASTER_PORT=port, LR="1e-3",
                          PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))
    result = run_command(["bash", "scripts/finetune_pmod_qwen2_5vl.sh", "--lora_enable", lora, "--lora_r", "4"],
                         env=env, timeout=900)
    assert "global batch 4 = 2 GPUs x 1 x 2 accumulation (deepspeed)" in result.stderr
    model, loading = from_pretrained(output, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    base = AutoModelForImageTextToText.from_pretrained(checkpoint).state_dict()
    trained = model.state_dict()
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    assert trained[key].shape == base[key].shape, "ZeRO-3 must save gathered, full-size weights"
    assert not torch.equal(trained[key], base[key]) and not any("lora_" in name for name in trained)
    routers = [value for name, value in trained.items() if ".router." in name]
    assert routers and any(value.abs().sum() > 0 for value in routers), "zero-initialised routers trained"
    model.eval()
    sample = Sample(text_before=[1, 20], text_after=[21, 22], image_sizes=((56, 84),))
    with torch.no_grad():
        assert torch.isfinite(model(**vlm_inputs(model, "qwen2_5_vl", [sample])).logits).all()


def test_a_pmod_checkpoint_trains_as_saved_and_contradicting_flags_are_named(tmp_path):
    from types import SimpleNamespace

    from llava.train.train_hf import HFModelArguments, load_model

    checkpoint = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "pmod", model=apply_pmod(tiny_vlm("qwen2_5_vl")))
    training = SimpleNamespace(attn_implementation="sdpa")
    same = HFModelArguments(model_name_or_path=checkpoint, mod_target_layers="shiftedcos_decay_0.85_0.15")
    assert type(load_model(same, training, torch.float32)).__name__ == "PmodQwen2_5_VLForConditionalGeneration"
    other = HFModelArguments(model_name_or_path=checkpoint, mod_target_layers="shiftedcos_decay_0.85_0.15",
                             mod_router_factor=0.4)
    with pytest.raises(ValueError, match=r"--mod_router_factor 0.4 \(saved: 0.5\)"):
        load_model(other, training, torch.float32)
