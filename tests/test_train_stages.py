"""End-to-end training through ``python -m llava.train.train`` on tiny models: stage 1, stage 2, LoRA, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_train
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def tiny_flags(tiny_models, output_dir, max_steps=2, **overrides) -> list[str]:
    """Small, deterministic fp32 settings shared by every tiny run."""
    flags = {
        "model_name_or_path": tiny_models.llm,
        "vision_tower": tiny_models.vision_tower,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1e-3,
        "model_max_length": 256,
        "save_strategy": "no",
        "logging_steps": 1,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "bf16": False,
        "seed": 0,
    }
    flags.update(overrides)
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]


def stage1(tiny_models, tiny_dataset, output_dir, **overrides):
    return run_train(tiny_flags(
        tiny_models, output_dir, version="plain", tune_mm_mlp_adapter=True,
        data_path=tiny_dataset.pretrain_json, image_folder=tiny_dataset.image_folder, **overrides,
    ))


def stage2_flags(tiny_models, tiny_dataset, output_dir, **overrides):
    return tiny_flags(
        tiny_models, output_dir, version="v1", data_path=tiny_dataset.instruct_json,
        image_folder=tiny_dataset.image_folder, image_aspect_ratio="pad", **overrides,
    )


def log_losses(output_dir) -> dict[int, float]:
    state = json.loads((Path(output_dir) / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def generate_once(model_dir, image_size=(48, 64)):
    """Load with the public loader and greedily generate a few tokens for one image."""
    from PIL import Image

    from llava.constants import DEFAULT_IMAGE_TOKEN
    from llava.conversation import get_conv_template
    from llava.mm_utils import process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, context_len = load_pretrained_model(str(model_dir), None, None, device="cpu")
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\nWhat color is the picture?")
    conv.append_message(conv.roles[1], None)
    input_ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt").unsqueeze(0)
    image = Image.new("RGB", image_size, (200, 30, 30))
    images = process_images([image], image_processor, model.config).to(model.dtype)
    with torch.inference_mode():
        output = model.generate(
            input_ids, images=images, image_sizes=[image.size], max_new_tokens=3, do_sample=False,
            attention_mask=torch.ones_like(input_ids),
        )
    return model, output


def test_stage1_then_stage2_then_generate(tiny_models, tiny_dataset, tmp_path):
    pretrain_dir = tmp_path / "pretrain"
    stage1(tiny_models, tiny_dataset, pretrain_dir, save_strategy="steps", save_steps=1)

    projector = torch.load(pretrain_dir / "mm_projector.bin", weights_only=True)
    assert sorted(projector) == [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    assert json.loads((pretrain_dir / "config.json").read_text())["mm_projector_type"] == "mlp2x_gelu"
    assert not (pretrain_dir / "model.safetensors").exists(), "stage 1 saves the projector only"
    checkpoint = pretrain_dir / "checkpoint-2"
    assert (checkpoint / "mm_projector.bin").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert sorted(log_losses(pretrain_dir)) == [1, 2]

    finetune_dir = tmp_path / "finetune"
    run_train(stage2_flags(
        tiny_models, tiny_dataset, finetune_dir,
        pretrain_mm_mlp_adapter=pretrain_dir / "mm_projector.bin", group_by_modality_length=True,
        mm_projector_lr=1e-4,
    ))
    config = json.loads((finetune_dir / "config.json").read_text())
    assert config["use_cache"] is True and config["image_aspect_ratio"] == "pad"
    assert config["mm_vision_tower"] == tiny_models.vision_tower
    assert (finetune_dir / "tokenizer_config.json").is_file()
    weights = load_file(finetune_dir / "model.safetensors")
    base = load_file(Path(tiny_models.llm) / "model.safetensors")
    tower = load_file(Path(tiny_models.vision_tower) / "model.safetensors")
    assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    tower_key = next(k for k in tower if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    saved_tower = [v for k, v in weights.items() if k.startswith("model.vision_tower.") and k.endswith(tower_key)]
    assert len(saved_tower) == 1 and torch.equal(saved_tower[0], tower[tower_key]), "the vision tower stays frozen"
    assert not torch.equal(weights["model.mm_projector.0.weight"], projector["model.mm_projector.0.weight"])

    model, output = generate_once(finetune_dir)
    assert type(model).__name__ == "LlavaLlamaForCausalLM"
    assert output.shape[0] == 1 and 1 <= output.shape[1] <= 3


def test_lora_trains_adapter_and_saves_merged_model(tiny_models, tiny_dataset, tmp_path):
    output_dir = tmp_path / "lora"
    run_train(stage2_flags(tiny_models, tiny_dataset, output_dir, lora_enable=True, lora_r=4, lora_alpha=8,
                           mm_projector_lr=1e-4, gradient_checkpointing=True))

    adapter_dir = output_dir / "lora_adapter"
    lora_keys = [k for k in load_file(adapter_dir / "adapter_model.safetensors") if "lora_A" in k]
    assert any("self_attn.q_proj" in k for k in lora_keys) and any("mlp.down_proj" in k for k in lora_keys)
    assert not any(part in k for k in lora_keys for part in ("lm_head", "mm_projector", "vision_tower", "router"))
    extra = load_file(adapter_dir / "non_lora_trainables.safetensors")
    assert any("mm_projector" in k for k in extra) and not any("lora_" in k for k in extra)

    merged = load_file(output_dir / "model.safetensors")
    base = load_file(Path(tiny_models.llm) / "model.safetensors")
    assert not any("lora_" in k for k in merged)
    key = "model.layers.1.self_attn.q_proj.weight"
    assert merged[key].shape == base[key].shape and not torch.equal(merged[key], base[key])
    assert torch.equal(merged["lm_head.weight"], base["lm_head.weight"]), "lm_head is neither LoRA-wrapped nor trained"

    _, output = generate_once(output_dir)
    assert output.shape[0] == 1 and output.shape[1] >= 1


def test_resume_continues_steps_and_losses(tiny_models, tiny_dataset, tmp_path):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    common = dict(save_strategy="steps", save_steps=2, max_steps=4, group_by_modality_length=True)
    run_train(stage2_flags(tiny_models, tiny_dataset, full_dir, **common))
    full_losses = log_losses(full_dir)
    assert sorted(full_losses) == [1, 2, 3, 4]

    shutil.copytree(full_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    run_train(stage2_flags(tiny_models, tiny_dataset, resumed_dir, **common, resume_from_checkpoint=True))
    resumed_losses = log_losses(resumed_dir)
    assert sorted(resumed_losses) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-4, abs=1e-5)


def test_stage1_resume_restores_the_projector(tiny_models, tiny_dataset, tmp_path):
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    stage1(tiny_models, tiny_dataset, full_dir, save_strategy="steps", save_steps=1)
    assert sorted(p.name for p in full_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]

    shutil.copytree(full_dir / "checkpoint-1", resumed_dir / "checkpoint-1")
    stage1(tiny_models, tiny_dataset, resumed_dir, save_strategy="steps", save_steps=1,
           resume_from_checkpoint=resumed_dir / "checkpoint-1")
    assert sorted(log_losses(resumed_dir)) == [1, 2]
    full = torch.load(full_dir / "mm_projector.bin", weights_only=True)
    resumed = torch.load(resumed_dir / "mm_projector.bin", weights_only=True)
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)
