"""scripts/finetune_pmod_next.sh end to end with tiny overrides (AnyRes data of several sizes), then the public
loader; and the recipe both NeXT scripts encode."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from conftest import run_command, subprocess_env, write_tiny_llava_dataset
from PIL import Image
from safetensors.torch import load_file
from test_train_stages import generate_once

# With 56 px tiles these sizes pick the 2x2, 1x2, 3x1, 1x2 (tie) and 2x1 grids.
IMAGE_SIZES = [(112, 84), (40, 72), (150, 50), (60, 60), (64, 48), (30, 90)]


def anyres_dataset(root):
    """The shared tiny data set with its images redrawn at sizes that need different AnyRes grids."""
    dataset = write_tiny_llava_dataset(root, num_image_samples=len(IMAGE_SIZES), num_text_samples=2)
    records = json.loads(Path(dataset.instruct_json).read_text())
    image_records = [record for record in records if "image" in record]
    for record, size in zip(image_records, IMAGE_SIZES):
        path = f"{dataset.image_folder}/{record['image']}"
        with Image.open(path) as old:
            color = old.getpixel((0, 0))
        Image.new("RGB", size, color).save(path)
    return dataset


@pytest.mark.slow
def test_pmod_next_script_trains_anyres_and_reloads(tiny_models, tmp_path):
    dataset = anyres_dataset(tmp_path / "data")
    output_dir = tmp_path / "pmod-next"
    result = run_command(["bash", "scripts/finetune_pmod_next.sh"], env=subprocess_env(
        LAUNCHER="python", PYTHON=sys.executable, MODEL=tiny_models.llm, VISION_TOWER=tiny_models.vision_tower,
        DATA_PATH=dataset.instruct_json, IMAGE_FOLDER=dataset.image_folder, OUTPUT_DIR=output_dir,
        PRETRAIN_ADAPTER="", NUM_GPUS=1, GLOBAL_BATCH=4, PER_DEVICE_BATCH=2, MAX_STEPS=2, MODEL_MAX_LENGTH=256,
        NUM_WORKERS=0, PRECISION_FLAGS="--bf16 False --tf32 False", LR="1e-2",
    ))
    assert "global batch 4 = 1 GPUs x 2 x 2 accumulation (python)" in result.stderr

    config = json.loads((output_dir / "config.json").read_text())
    assert config["model_type"] == "pmod_llava_llama"
    assert config["image_aspect_ratio"] == "anyres" and config["mm_patch_merge_type"] == "spatial_unpad"
    assert config["image_grid_pinpoints"] == [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    assert config["max_num_sub_images"] == 4 and config["tokenizer_model_max_length"] == 256
    assert config["mod_target_layers"] == "shiftedcos_decay_0.85_0.15"
    assert config["mod_target_token_type"] == "vision_all"
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    weights = load_file(output_dir / "model.safetensors")
    assert weights["model.image_newline"].shape == (config["hidden_size"],)

    model, output = generate_once(output_dir, image_size=(112, 84))
    assert type(model).__name__ == "PmodLlavaLlamaForCausalLM"
    assert model.config.image_aspect_ratio == "anyres" and model.config.mm_patch_merge_type == "spatial_unpad"
    assert output.shape[0] == 1 and output.shape[1] >= 1


def script_command(name: str, **env) -> dict[str, str]:
    """The `--flag value` pairs a script passes to llava.train.train with its defaults (DRY_RUN prints them)."""
    result = run_command(["bash", f"scripts/{name}"], env=subprocess_env(DRY_RUN=1, NUM_GPUS=8, **env))
    words = shlex.split(result.stdout)
    return {words[i][2:]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}


@pytest.mark.parametrize("name", ["finetune_pmod_next.sh", "finetune_next.sh"])
def test_next_scripts_encode_the_paper_recipe(name):
    flags = script_command(name)
    expected = dict(
        model_name_or_path="lmsys/vicuna-7b-v1.5", vision_tower="openai/clip-vit-large-patch14-336",
        pretrain_mm_mlp_adapter="./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin",
        data_path="./playground/data/llava_next_data.json", image_folder="./playground/data/llava_next_images",
        per_device_train_batch_size="8", gradient_accumulation_steps="2", learning_rate="2e-5",
        num_train_epochs="1", model_max_length="4096", image_aspect_ratio="anyres", max_num_sub_images="4",
        mm_patch_merge_type="spatial_unpad", deepspeed="scripts/zero3.json", version="v1",
        mm_projector_type="mlp2x_gelu", mm_vision_select_layer="-2", group_by_modality_length="True",
        gradient_checkpointing="True", bf16="True", tf32="True",
    )
    assert {key: flags.get(key) for key in expected} == expected
    pmod = dict(
        mod_target_layers="shiftedcos_decay_0.85_0.15", mod_target_token_type="vision_all", mod_router_factor="0.5",
        mod_weight_norm="tanh_0.2_1", mod_bias_enabled="True", mod_special_init="True",
    )
    if name == "finetune_pmod_next.sh":
        assert {key: flags.get(key) for key in pmod} == pmod
        assert flags["output_dir"] == "./checkpoints/pmod-llava-next-7b"
    else:
        assert not any(key.startswith("mod_") for key in flags)
        assert flags["output_dir"] == "./checkpoints/llava-next-7b"


def test_pmod_flags_follow_their_environment_variables():
    flags = script_command("finetune_pmod.sh", MOD_ROUTER_FACTOR="0.4", MOD_TARGET_LAYERS="interleave")
    assert flags["mod_router_factor"] == "0.4" and flags["mod_target_layers"] == "interleave"
    assert flags["deepspeed"] == "scripts/zero2.json" and flags["gradient_accumulation_steps"] == "4"


def test_next_scripts_split_the_global_batch_over_eight_gpus(tmp_path):
    """128 = 8 GPUs x 8 x 2: the launcher line is printed before anything is run (here: an unknown tool)."""
    env = subprocess_env(LAUNCHER="python", PYTHON="false", NUM_GPUS=8)
    result = run_command(["bash", "scripts/finetune_next.sh"], env=env, expect_success=False)
    assert result.returncode != 0
    assert "global batch 128 = 8 GPUs x 8 x 2 accumulation (python)" in result.stderr


def test_multi_node_launch_lines_keep_the_global_batch(tmp_path):
    """4 nodes x 8 GPUs: accumulation drops 4x; torchrun gets the rendezvous flags, deepspeed the hostfile."""
    torchrun = run_command(["bash", "scripts/finetune_pmod.sh"], env=subprocess_env(
        DRY_RUN=1, NUM_GPUS=8, LAUNCHER="torchrun", NNODES=4, NODE_RANK=2, MASTER_ADDR="10.0.0.1", MASTER_PORT=29700))
    words = shlex.split(torchrun.stdout)
    assert words[:11] == ["torchrun", "--nnodes", "4", "--node_rank", "2", "--nproc_per_node", "8", "--master_addr",
                          "10.0.0.1", "--master_port", "29700"]
    assert "global batch 128 = 4 nodes x 8 GPUs x 4 x 1 accumulation (torchrun)" in torchrun.stderr

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# four nodes\nnode-a slots=8\nnode-b slots=8\nnode-c slots=8\nnode-d slots=8\n")
    deepspeed = run_command(["bash", "scripts/finetune_pmod.sh"], env=subprocess_env(
        DRY_RUN=1, NUM_GPUS=8, HOSTFILE=hostfile, MASTER_ADDR="node-a"))
    words = shlex.split(deepspeed.stdout)
    assert words[words.index("--hostfile") + 1] == str(hostfile) and words[words.index("--num_nodes") + 1] == "4"
    assert "--no_ssh" not in words and "global batch 128 = 4 nodes x 8 GPUs x 4 x 1" in deepspeed.stderr
    no_ssh = run_command(["bash", "scripts/finetune_pmod.sh"], env=subprocess_env(
        DRY_RUN=1, NUM_GPUS=8, HOSTFILE=hostfile, MASTER_ADDR="node-a", NO_SSH=1, NODE_RANK=3))
    words = shlex.split(no_ssh.stdout)
    assert words[words.index("--no_ssh") + 1:words.index("--no_ssh") + 3] == ["--node_rank", "3"]


@pytest.mark.parametrize("env, message", [
    (dict(LAUNCHER="torchrun", NNODES=2, NODE_RANK=2), "NODE_RANK=2 must be in [0, NNODES=2)"),
    (dict(LAUNCHER="python", NNODES=2), "NNODES=2 needs LAUNCHER=torchrun or deepspeed"),
    (dict(LAUNCHER="torchrun", HOSTFILE="/no/hostfile"), "HOSTFILE is for LAUNCHER=deepspeed"),
    (dict(LAUNCHER="torchrun", NNODES=3), "not a multiple of NNODES=3"),
])
def test_bad_multi_node_settings_are_named(env, message):
    result = run_command(["bash", "scripts/finetune.sh"], env=subprocess_env(DRY_RUN=1, NUM_GPUS=8, **env),
                         expect_success=False)
    assert result.returncode == 2 and message in result.stderr


@pytest.fixture
def flags_only(monkeypatch):
    """Building a model or tokenizer means the flags passed validation."""
    from llava.train import train as train_module

    class Validated(Exception):
        pass

    def stop(*args, **kwargs):
        raise Validated

    monkeypatch.setattr(train_module, "build_tokenizer", stop)
    monkeypatch.setattr(train_module, "build_model", stop)
    return Validated


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--image_aspect_ratio", "anyres", "--max_num_sub_images", "5", "--mm_patch_merge_type", "spatial_unpad"],
         "--max_num_sub_images"),
        (["--image_aspect_ratio", "anyres"], "--mm_patch_merge_type"),
        (["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "spatial_pad"], "--mm_patch_merge_type"),
        (["--image_aspect_ratio", "any_res"], "--image_aspect_ratio"),
    ],
)
def test_bad_anyres_flags_are_rejected_before_a_model_is_built(flags_only, tiny_models, tiny_dataset, tmp_path,
                                                               extra, flag):
    from llava.train.train import train

    argv = ["--model_name_or_path", tiny_models.llm, "--vision_tower", tiny_models.vision_tower,
            "--data_path", tiny_dataset.instruct_json, "--image_folder", tiny_dataset.image_folder,
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", *extra]
    with pytest.raises(ValueError, match=flag):
        train(argv)


def test_good_anyres_flags_pass_validation(flags_only, tiny_models, tiny_dataset, tmp_path):
    from llava.train.train import train

    argv = ["--model_name_or_path", tiny_models.llm, "--vision_tower", tiny_models.vision_tower,
            "--data_path", tiny_dataset.instruct_json, "--image_folder", tiny_dataset.image_folder,
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--image_aspect_ratio", "anyres",
            "--max_num_sub_images", "9", "--mm_patch_merge_type", "spatial_unpad"]
    with pytest.raises(flags_only):
        train(argv)
