"""The p-MoD stage-2 script with tiny overrides, and the scripts' batch and launcher checks.

pretrain.sh and finetune.sh run in test_train_stages.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_command, subprocess_env, tiny_script_env
from safetensors.torch import load_file
from test_train_stages import generate_once

pytestmark = pytest.mark.slow


def test_finetune_pmod_script_trains_routers_and_reloads(tiny_models, tiny_dataset, tmp_path):
    output_dir = tmp_path / "pmod"
    run_command(["bash", "scripts/finetune_pmod.sh"], env=tiny_script_env(
        tiny_models, tiny_dataset, output_dir, DATA_PATH=tiny_dataset.instruct_json,
        PRETRAIN_ADAPTER="", GRADIENT_CHECKPOINTING="True", LR="1e-2",
    ))

    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "pmod_llava_llama"
    assert config["mod_target_layers"] == "shiftedcos_decay_0.85_0.15"
    assert config["mod_weight_norm"] == "tanh_0.2_1" and config["mod_target_token_type"] == "vision_all"
    assert config["mod_bias_enabled"] is True and config["mod_special_init"] is True
    weights = load_file(output_dir / "model.safetensors")
    routers = {k: v for k, v in weights.items() if ".router.router." in k}
    assert routers and all(k.startswith("model.layers.") for k in routers)
    last = f"model.layers.{config['num_hidden_layers'] - 1}."
    # The last layer's vision tokens feed no later token, so the text loss gives its router no gradient.
    trained = {k: v for k, v in routers.items() if not k.startswith(last)}
    assert trained and all(torch.count_nonzero(v) > 0 for v in trained.values()), "zero-initialised routers must train"
    assert any(k.endswith(".decoder_layer.mlp.up_proj.weight") for k in weights)

    model, output = generate_once(output_dir)
    assert type(model).__name__ == "PmodLlavaLlamaForCausalLM"
    assert output.shape[0] == 1 and output.shape[1] >= 1


def test_scripts_reject_a_global_batch_that_does_not_divide(tmp_path):
    env = subprocess_env(LAUNCHER="python", NUM_GPUS=3, GLOBAL_BATCH=128, PER_DEVICE_BATCH=16)
    result = run_command(["bash", "scripts/finetune.sh"], env=env, expect_success=False)
    assert result.returncode == 2
    assert "GLOBAL_BATCH=128 is not a multiple of NUM_GPUS=3 x PER_DEVICE_BATCH=16" in result.stderr


def test_scripts_reject_an_unknown_launcher(tmp_path):
    env = subprocess_env(LAUNCHER="mpirun", NUM_GPUS=1, GLOBAL_BATCH=2, PER_DEVICE_BATCH=2)
    result = run_command(["bash", "scripts/pretrain.sh"], env=env, expect_success=False)
    assert result.returncode == 2 and "LAUNCHER must be deepspeed, torchrun or python" in result.stderr
