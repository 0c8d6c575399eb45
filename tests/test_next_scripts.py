"""scripts/finetune_pmod_next.sh end to end with tiny overrides (AnyRes data of several sizes), then the public
loader; and the recipe both NeXT scripts encode."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_command, subprocess_env, write_tiny_llava_dataset
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


def script_flags(name: str) -> dict[str, str]:
    """A script's variable defaults (`${VAR:-default}`, `${VAR-default}`, `VAR=value`) and its literal flags."""
    text = (REPO_ROOT / "scripts" / name).read_text()
    defaults = dict(re.findall(r"^(\w+)=\$\{\1:?-(.*)\}$", text, flags=re.M))
    constants = dict(re.findall(r"^(\w+)=([^$\s]+)$", text, flags=re.M))
    literal = dict(re.findall(r"^\s+--(\w+) ([^\s\"$]+) \\$", text, flags=re.M))
    return {**defaults, **constants, **literal}


@pytest.mark.parametrize("name", ["finetune_pmod_next.sh", "finetune_next.sh"])
def test_next_scripts_encode_the_paper_recipe(name):
    flags = script_flags(name)
    expected = dict(
        MODEL="lmsys/vicuna-7b-v1.5", VISION_TOWER="openai/clip-vit-large-patch14-336",
        PRETRAIN_ADAPTER="./checkpoints/llava-v1.5-7b-pretrain/mm_projector.bin",
        DATA_PATH="./playground/data/llava_next_data.json", IMAGE_FOLDER="./playground/data/llava_next_images",
        GLOBAL_BATCH="128", PER_DEVICE_BATCH="8", LR="2e-5", EPOCHS="1", MODEL_MAX_LENGTH="4096",
        IMAGE_ASPECT_RATIO="anyres", MAX_NUM_SUB_IMAGES="4", MM_PATCH_MERGE_TYPE="spatial_unpad",
        DEFAULT_DS_CONFIG="scripts/zero3.json", version="v1", mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer="-2", group_by_modality_length="True",
    )
    assert {key: flags.get(key) for key in expected} == expected
    pmod = dict(
        MOD_TARGET_LAYERS="shiftedcos_decay_0.85_0.15", MOD_TARGET_TOKEN_TYPE="vision_all", MOD_ROUTER_FACTOR="0.5",
        MOD_WEIGHT_NORM="tanh_0.2_1", MOD_BIAS_ENABLED="True", MOD_SPECIAL_INIT="True",
    )
    if name == "finetune_pmod_next.sh":
        assert {key: flags.get(key) for key in pmod} == pmod
        assert flags["OUTPUT_DIR"] == "./checkpoints/pmod-llava-next-7b"
    else:
        assert not any(key.startswith("MOD_") for key in flags)
        assert flags["OUTPUT_DIR"] == "./checkpoints/llava-next-7b"


def test_next_scripts_split_the_global_batch_over_eight_gpus(tmp_path):
    """128 = 8 GPUs x 8 x 2: the launcher line is printed before anything is run (here: an unknown tool)."""
    env = subprocess_env(LAUNCHER="python", PYTHON="false", NUM_GPUS=8)
    result = run_command(["bash", "scripts/finetune_next.sh"], env=env, expect_success=False)
    assert result.returncode != 0
    assert "global batch 128 = 8 GPUs x 8 x 2 accumulation (python)" in result.stderr


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
