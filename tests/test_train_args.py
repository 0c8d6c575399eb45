"""Flag validation (before any model is built), optimizer groups and the modality-grouped sampler, in-process."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture
def no_model_build(monkeypatch):
    """Fail loudly if validation lets a bad flag through to model construction."""
    from llava.train import train as train_module

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the flags were validated")

    monkeypatch.setattr(train_module, "build_model", forbidden)
    monkeypatch.setattr(train_module, "build_tokenizer", forbidden)


def base_argv(tiny_models, tiny_dataset, tmp_path, *extra):
    return [
        "--model_name_or_path", tiny_models.llm, "--vision_tower", tiny_models.vision_tower,
        "--data_path", tiny_dataset.instruct_json, "--image_folder", tiny_dataset.image_folder,
        "--output_dir", str(tmp_path / "out"), "--report_to", "none", *extra,
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mod_target_layers", "zigzag_decay_0.85_0.15", "--mod_weight_norm", "tanh_0.2_1"], "zigzag"),
        (["--mod_target_layers", "shiftedcos_decay_0.85_0.15"], "--mod_weight_norm"),
        (["--mod_target_layers", "shiftedcos_decay_0.85_0.15", "--mod_weight_norm", "tanh_0.2_1",
          "--mod_target_token_type", "text"], "--mod_target_token_type"),
        (["--version", "no_such_template"], "--version"),
        (["--bits", "4"], "--bits"),
        (["--lora_bias", "some"], "--lora_bias"),
        (["--attn_implementation", "fast"], "--attn_implementation"),
        (["--tune_mm_mlp_adapter", "True", "--lora_enable", "True"], "--lora_enable"),
        (["--pretrain_mm_mlp_adapter", "/no/such/mm_projector.bin"], "--pretrain_mm_mlp_adapter"),
        (["--mm_use_im_start_end", "True"], "--mm_use_im_start_end"),
        (["--image_aspect_ratio", "letterbox"], "--image_aspect_ratio"),
        (["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "flat"], "--mm_patch_merge_type"),
        (["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "spatial_unpad", "--max_num_sub_images", "6"],
         "--max_num_sub_images"),
        (["--mm_vision_tower_lr", "2e-6"], "--unfreeze_mm_vision_tower"),
        (["--tune_mm_mlp_adapter", "True", "--unfreeze_mm_vision_tower", "True"], "--unfreeze_mm_vision_tower"),
        (["--image_grid_pinpoints", "[(336, 672)]"], "--image_grid_pinpoints needs"),
        (["--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "spatial_unpad", "--image_grid_pinpoints",
          "big"], "--image_grid_pinpoints 'big'"),
    ],
)
def test_bad_flags_are_rejected_before_a_model_is_built(no_model_build, tiny_models, tiny_dataset, tmp_path,
                                                        extra, message):
    from llava.train.train import train

    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        train(base_argv(tiny_models, tiny_dataset, tmp_path, *extra))


def test_missing_data_file_names_the_flag(no_model_build, tiny_models, tmp_path):
    from llava.train.train import train

    argv = ["--model_name_or_path", tiny_models.llm, "--data_path", str(tmp_path / "none.json"),
            "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="--data_path"):
        train(argv)


def test_mod_token_type_defaults_to_vision_all(tiny_models, tiny_dataset, tmp_path):
    from llava.train.train import parse_args

    model_args, _, training_args = parse_args(base_argv(
        tiny_models, tiny_dataset, tmp_path, "--mod_target_layers", "shiftedcos_decay_0.85_0.15",
        "--resume_from_checkpoint", "True",
    ))
    assert model_args.mod_target_token_type == "vision_all"
    assert training_args.resume_from_checkpoint is True
    dense_args, _, _ = parse_args(base_argv(tiny_models, tiny_dataset, tmp_path))
    assert dense_args.mod_target_token_type is None and not dense_args.mod_enabled


def test_lora_targets_skip_head_projector_tower_and_routers():
    from llava.train.train import lora_target_modules

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(2, 2)
            self.router = nn.Sequential(nn.Linear(2, 1))

    model = nn.Module()
    model.layers = nn.ModuleList([Layer()])
    model.mm_projector = nn.Sequential(nn.Linear(2, 2))
    model.vision_tower = nn.Sequential(nn.Linear(2, 2))
    model.lm_head = nn.Linear(2, 2)
    assert lora_target_modules(model) == ["layers.0.q_proj"]


def test_param_groups_split_by_module_and_decay():
    from llava.train.llava_trainer import build_param_groups

    model = nn.Module()
    model.mm_projector = nn.Linear(2, 2)
    model.vision_tower = nn.Linear(2, 2)
    model.body = nn.Linear(2, 2)
    model.frozen = nn.Linear(2, 2).requires_grad_(False)
    decay = {"mm_projector.weight", "vision_tower.weight", "body.weight"}
    groups = build_param_groups(model, decay, 0.1, {"mm_projector": 2e-5, "vision_tower": 2e-6})

    def find(param):
        return next(g for g in groups if any(p is param for p in g["params"]))

    assert find(model.mm_projector.weight) == {"params": [model.mm_projector.weight], "weight_decay": 0.1, "lr": 2e-5}
    assert find(model.mm_projector.bias)["weight_decay"] == 0.0 and find(model.mm_projector.bias)["lr"] == 2e-5
    assert find(model.vision_tower.weight)["lr"] == 2e-6
    assert "lr" not in find(model.body.weight) and find(model.body.bias)["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == 6, "frozen parameters stay out of the optimizer"


class ModalityDataset(torch.utils.data.Dataset):
    """Positive lengths for image samples, negative for text-only ones (LLaVA's modality_lengths)."""

    def __init__(self, lengths):
        self.modality_lengths = lengths

    def __len__(self):
        return len(self.modality_lengths)

    def __getitem__(self, index):
        return {"input_ids": torch.tensor([index])}


def test_trainer_groups_batches_by_modality(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from llava.train.llava_trainer import LLaVATrainer
    from llava.train.train import TrainingArguments

    lengths = [10 + i for i in range(24)] + [-(5 + i) for i in range(12)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3,
        group_by_modality_length=True, report_to="none", use_cpu=True,
    )
    trainer = LLaVATrainer(model=AutoModelForCausalLM.from_pretrained(tiny_models.llm), args=args,
                           train_dataset=ModalityDataset(lengths))
    order = list(trainer._get_train_sampler())
    assert sorted(order) == list(range(len(lengths)))
    megabatch = 2 * 3
    for start in range(0, len(order), megabatch):
        signs = {lengths[i] > 0 for i in order[start:start + megabatch]}
        assert len(signs) == 1, f"megabatch at {start} mixes image and text-only samples"


def trainable_groups(tiny_models, tiny_dataset, tmp_path, *extra):
    """Build the tiny model as train() does and report which parameter families are trainable."""
    from llava.train.train import build_model, configure_trainable, parse_args, validate_args

    model_args, data_args, training_args = parse_args(base_argv(
        tiny_models, tiny_dataset, tmp_path, "--mm_projector_type", "mlp2x_gelu", "--use_cpu", "True", *extra,
    ))
    llm_config = validate_args(model_args, data_args, training_args)
    model = build_model(model_args, data_args, training_args, torch.float32, llm_config)
    configure_trainable(model, model_args, training_args)
    families = {"mm_projector": "projector", "vision_tower": "tower", "router": "router", "lm_head": "head",
                "embed_tokens": "embeddings", "layers.": "llm"}
    trainable = {}
    for name, param in model.named_parameters():
        family = next(f for key, f in families.items() if key in name) if any(k in name for k in families) else "other"
        trainable.setdefault(family, set()).add(param.requires_grad)
    return {family: flags == {True} for family, flags in trainable.items()}, data_args


def test_stage1_trains_only_the_projector(tiny_models, tiny_dataset, tmp_path):
    trainable, data_args = trainable_groups(tiny_models, tiny_dataset, tmp_path, "--tune_mm_mlp_adapter", "True")
    assert trainable == {"projector": True, "tower": False, "head": False, "embeddings": False, "llm": False,
                         "other": False}
    assert data_args.is_multimodal and data_args.image_processor is not None


def test_stage2_trains_llm_and_projector_but_not_the_tower(tiny_models, tiny_dataset, tmp_path):
    trainable, _ = trainable_groups(tiny_models, tiny_dataset, tmp_path)
    assert trainable == {"projector": True, "tower": False, "head": True, "embeddings": True, "llm": True,
                         "other": True}


def test_pmod_freeze_backbone_keeps_new_modules_trainable(tiny_models, tiny_dataset, tmp_path):
    trainable, _ = trainable_groups(
        tiny_models, tiny_dataset, tmp_path, "--freeze_backbone", "True",
        "--mod_target_layers", "shiftedcos_decay_0.85_0.15", "--mod_weight_norm", "tanh_0.2_1",
    )
    assert trainable["router"] and trainable["projector"] and trainable["head"]
    assert not trainable["llm"] and not trainable["embeddings"] and not trainable["tower"]


def test_anyres_records_grid_pinpoints(tiny_models, tiny_dataset, tmp_path):
    from llava.train.train import build_model, parse_args, validate_args

    model_args, data_args, training_args = parse_args(base_argv(
        tiny_models, tiny_dataset, tmp_path, "--image_aspect_ratio", "anyres", "--mm_patch_merge_type",
        "spatial_unpad", "--max_num_sub_images", "4", "--use_cpu", "True",
    ))
    llm_config = validate_args(model_args, data_args, training_args)
    model = build_model(model_args, data_args, training_args, torch.float32, llm_config)
    tile = data_args.image_processor.crop_size["height"]
    assert model.config.image_grid_pinpoints == data_args.image_grid_pinpoints
    assert [tile, 2 * tile] in data_args.image_grid_pinpoints and [2 * tile, 2 * tile] in data_args.image_grid_pinpoints
    assert model.config.image_aspect_ratio == "anyres" and model.config.max_num_sub_images == 4


@pytest.mark.parametrize("flag, tiles", [
    ("[(56, 112), (112, 56), (112, 112)]", [[1, 2], [2, 1], [2, 2]]),
    ("(1x1),...,(2x3)", [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]),
])
def test_image_grid_pinpoints_as_llava_next_writes_them(tiny_models, tiny_dataset, tmp_path, flag, tiles):
    from llava.train.train import build_model, parse_args, validate_args

    model_args, data_args, training_args = parse_args(base_argv(
        tiny_models, tiny_dataset, tmp_path, "--image_aspect_ratio", "anyres", "--mm_patch_merge_type",
        "spatial_unpad", "--image_grid_pinpoints", flag, "--use_cpu", "True",
    ))
    model = build_model(model_args, data_args, training_args, torch.float32,
                        validate_args(model_args, data_args, training_args))
    tile = data_args.image_processor.crop_size["height"]
    assert data_args.image_grid_pinpoints == [[w * tile, h * tile] for w, h in tiles]
    assert model.config.image_grid_pinpoints == data_args.image_grid_pinpoints


def test_unfrozen_vision_tower_trains_at_its_own_learning_rate(tiny_models, tiny_dataset, tmp_path):
    from llava.train.llava_trainer import LLaVATrainer
    from llava.train.train import build_model, configure_trainable, parse_args, validate_args

    trainable, _ = trainable_groups(tiny_models, tiny_dataset, tmp_path, "--unfreeze_mm_vision_tower", "True")
    assert trainable["tower"] and trainable["llm"] and trainable["projector"]
    model_args, data_args, training_args = parse_args(base_argv(
        tiny_models, tiny_dataset, tmp_path, "--unfreeze_mm_vision_tower", "True", "--mm_vision_tower_lr", "2e-6",
        "--mm_projector_lr", "3e-5", "--learning_rate", "1e-4", "--use_cpu", "True", "--mm_projector_type", "mlp2x_gelu",
    ))
    model = build_model(model_args, data_args, training_args, torch.float32,
                        validate_args(model_args, data_args, training_args))
    configure_trainable(model, model_args, training_args)
    assert model.config.unfreeze_mm_vision_tower and model.config.mm_vision_tower_lr == 2e-6
    optimizer = LLaVATrainer(model=model, args=training_args).create_optimizer()
    lr_of = {id(param): group["lr"] for group in optimizer.param_groups for param in group["params"]}
    named = dict(model.named_parameters())
    tower = [name for name in named if "vision_tower" in name]
    assert tower and all(lr_of[id(named[name])] == 2e-6 for name in tower)
    assert lr_of[id(named["model.mm_projector.0.weight"])] == 3e-5
    assert lr_of[id(named["model.layers.0.mlp.up_proj.weight"])] == 1e-4

