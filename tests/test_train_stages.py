"""End-to-end training on tiny models: stage 1 and stage 2 through scripts/pretrain.sh and scripts/finetune.sh
(which run ``python -m llava.train.train``), LoRA and resuming through ``python -m llava.train.train`` itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_command, run_train, tiny_script_env
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


@pytest.fixture(scope="module")
def pretrain_run(tiny_models, tiny_dataset, tmp_path_factory):
    """Stage 1 through scripts/pretrain.sh: 2 steps of global batch 4 (2 per device x 2 accumulation)."""
    output_dir = tmp_path_factory.mktemp("pretrain-script") / "pretrain"
    env = tiny_script_env(tiny_models, tiny_dataset, output_dir, DATA_PATH=tiny_dataset.pretrain_json,
                          GRADIENT_CHECKPOINTING="False", SAVE_STEPS=1)
    result = run_command(["bash", "scripts/pretrain.sh", "--save_total_limit", "2"], env=env)
    return output_dir, result


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


def test_pretrain_script_saves_projector_and_checkpoints(pretrain_run):
    pretrain_dir, result = pretrain_run
    assert "global batch 4 = 1 GPUs x 2 x 2 accumulation (python)" in result.stderr
    projector = torch.load(pretrain_dir / "mm_projector.bin", weights_only=True)
    assert sorted(projector) == [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    assert json.loads((pretrain_dir / "config.json").read_text())["mm_projector_type"] == "mlp2x_gelu"
    assert not (pretrain_dir / "model.safetensors").exists(), "stage 1 saves the projector only"
    for step in (1, 2):
        checkpoint = pretrain_dir / f"checkpoint-{step}"
        assert (checkpoint / "mm_projector.bin").is_file() and (checkpoint / "optimizer.pt").is_file()
    state = json.loads((pretrain_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["train_batch_size"] == 2
    assert sorted(log_losses(pretrain_dir)) == [1, 2]


def test_finetune_script_from_stage1_then_generate(pretrain_run, tiny_models, tiny_dataset, tmp_path):
    pretrain_dir, _ = pretrain_run
    finetune_dir = tmp_path / "finetune"
    env = tiny_script_env(tiny_models, tiny_dataset, finetune_dir, DATA_PATH=tiny_dataset.instruct_json,
                          PRETRAIN_ADAPTER=pretrain_dir / "mm_projector.bin", GRAD_ACCUM=1, LR="1e-3")
    run_command(["bash", "scripts/finetune.sh", "--mm_projector_lr", "1e-4"], env=env)

    config = json.loads((finetune_dir / "config.json").read_text())
    assert config["use_cache"] is True and config["image_aspect_ratio"] == "pad"
    assert config["mm_vision_tower"] == tiny_models.vision_tower and config["mm_projector_lr"] == 1e-4
    assert (finetune_dir / "tokenizer_config.json").is_file()
    weights = load_file(finetune_dir / "model.safetensors")
    base = load_file(Path(tiny_models.llm) / "model.safetensors")
    tower = load_file(Path(tiny_models.vision_tower) / "model.safetensors")
    projector = torch.load(pretrain_dir / "mm_projector.bin", weights_only=True)
    assert not torch.equal(weights["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    tower_key = next(k for k in tower if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    saved_tower = [v for k, v in weights.items() if k.startswith("model.vision_tower.") and k.endswith(tower_key)]
    assert len(saved_tower) == 1 and torch.equal(saved_tower[0], tower[tower_key]), "the vision tower stays frozen"
    assert not torch.equal(weights["model.mm_projector.0.weight"], projector["model.mm_projector.0.weight"])

    model, output = generate_once(finetune_dir)
    assert type(model).__name__ == "LlavaLlamaForCausalLM"
    assert output.shape[0] == 1 and 1 <= output.shape[1] <= 3


def test_lora_trains_adapter_saves_merged_model_and_resumes(tiny_models, tiny_dataset, tmp_path):
    output_dir, resumed_dir = tmp_path / "lora", tmp_path / "lora-resumed"
    lora = dict(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, mm_projector_lr=1e-4,
                gradient_checkpointing=True, save_strategy="steps", save_steps=1)
    run_train(stage2_flags(tiny_models, tiny_dataset, output_dir, **lora))
    assert (output_dir / "checkpoint-1" / "non_lora_trainables.safetensors").is_file()
    shutil.copytree(output_dir / "checkpoint-1", resumed_dir / "checkpoint-1")
    run_train(stage2_flags(tiny_models, tiny_dataset, resumed_dir, **lora, resume_from_checkpoint=True))

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

    resumed = load_file(resumed_dir / "model.safetensors")
    for name in (key, "model.mm_projector.0.weight"):
        torch.testing.assert_close(resumed[name], merged[name], rtol=1e-5, atol=1e-6)

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


def test_stage1_resume_restores_the_projector(pretrain_run, tiny_models, tiny_dataset, tmp_path):
    full_dir, _ = pretrain_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full_dir / "checkpoint-1", resumed_dir / "checkpoint-1")
    env = tiny_script_env(tiny_models, tiny_dataset, resumed_dir, DATA_PATH=tiny_dataset.pretrain_json,
                          GRADIENT_CHECKPOINTING="False", SAVE_STEPS=1)
    run_command(["bash", "scripts/pretrain.sh", "--resume_from_checkpoint", resumed_dir / "checkpoint-1"], env=env)

    assert sorted(log_losses(resumed_dir)) == [1, 2]
    full = torch.load(full_dir / "mm_projector.bin", weights_only=True)
    resumed = torch.load(resumed_dir / "mm_projector.bin", weights_only=True)
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6)


def test_train_mem_entry_trains_the_unfrozen_tower(tiny_models, tiny_dataset, tmp_path):
    """`llava/train/train_mem.py` (what LLaVA's and p-MoD's scripts launch), run as a file, with the tower unfrozen."""
    import sys

    output_dir = tmp_path / "train-mem"
    flags = stage2_flags(tiny_models, tiny_dataset, output_dir, max_steps=1, unfreeze_mm_vision_tower=True,
                         mm_vision_tower_lr=1e-3)
    run_command([sys.executable, "llava/train/train_mem.py", *flags])
    weights = load_file(output_dir / "model.safetensors")
    tower = load_file(Path(tiny_models.vision_tower) / "model.safetensors")
    key = next(k for k in tower if k.endswith("encoder.layers.0.mlp.fc1.weight"))
    saved = next(v for k, v in weights.items() if k.startswith("model.vision_tower.") and k.endswith(key))
    assert not torch.equal(saved, tower[key]), "the unfrozen tower must train"
    config = json.loads((output_dir / "config.json").read_text())
    assert config["unfreeze_mm_vision_tower"] is True and config["mm_vision_tower_lr"] == 1e-3



def test_packing_trains_with_the_padded_losses(tiny_models, tiny_dataset, tmp_path):
    """``--packing True`` (p-MoD, gradient checkpointing, batch 4 of mixed image and text-only samples) logs the
    losses of the padded run step by step and saves a checkpoint that loads and generates."""
    pmod = dict(mod_target_layers="shiftedcos_decay_0.85_0.15", mod_router_factor=0.5, mod_weight_norm="tanh_0.2_1",
                per_device_train_batch_size=4, gradient_checkpointing=True, max_steps=3)
    run_train(stage2_flags(tiny_models, tiny_dataset, tmp_path / "padded", **pmod))
    run_train(stage2_flags(tiny_models, tiny_dataset, tmp_path / "packed", **pmod, packing=True))
    padded, packed = log_losses(tmp_path / "padded"), log_losses(tmp_path / "packed")
    assert sorted(packed) == [1, 2, 3]
    for step, loss in padded.items():
        assert packed[step] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert "pmod_packed" not in json.dumps(config)
    _, output = generate_once(tmp_path / "packed")
    assert output.shape[1] >= 1


def test_packing_flag_needs_a_packable_attention(tiny_models, tiny_dataset, tmp_path):
    result = run_train(stage2_flags(tiny_models, tiny_dataset, tmp_path / "eager", packing=True,
                                    attn_implementation="eager"), expect_success=False)
    assert "--packing True needs --attn_implementation sdpa" in result.stderr
