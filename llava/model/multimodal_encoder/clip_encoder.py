"""CLIP vision tower: features of one hidden layer (LLaVA uses the penultimate), patch tokens only.

The tower is built from a hub name, a local folder, or (``delay_load``) from its config alone, in which case
the weights come from the LLaVA checkpoint that contains it (p-MoD checkpoints carry their tower).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from llava.mm_utils import load_image_processor

logger = logging.getLogger(__name__)

# Enough to build CLIP-L/14-336 offline (e.g. benchmarks with random weights, or a checkpoint that carries the
# tower's weights) when the hub cannot be reached.
KNOWN_TOWERS = {
    "openai/clip-vit-large-patch14-336": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resolve_tower_path(name: str, search_dirs: tuple[str | Path, ...] = ()) -> str:
    """A local folder for ``name`` if one exists (as given, then under each search dir), else ``name`` itself.

    Checkpoints may store a relative tower name; searching the checkpoint folder and its parent finds a tower
    saved beside the checkpoint, whatever the current directory is.
    """
    candidates = [Path(name)] + [Path(d) / name for d in search_dirs]
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return str(candidate)
    return name


def load_tower_image_processor(path: str, image_size: int):
    """The tower folder's image processor; for a known hub tower, a cached copy or CLIP's defaults."""
    if path not in KNOWN_TOWERS:
        return load_image_processor(path)
    try:
        return load_image_processor(path, local_files_only=True)
    except OSError:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            do_center_crop=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3,
        )


def load_vision_config(path: str) -> CLIPVisionConfig:
    """The tower's config; for a known hub tower, a cached copy or the built-in one (no network wait)."""
    if path not in KNOWN_TOWERS:
        return CLIPVisionConfig.from_pretrained(path)
    try:
        return CLIPVisionConfig.from_pretrained(path, local_files_only=True)
    except OSError:
        logger.info("Using the built-in config of %s (no local copy)", path)
        return CLIPVisionConfig(**KNOWN_TOWERS[path])


class CLIPVisionTower(nn.Module):
    def __init__(self, name_or_path: str, select_layer: int = -2, select_feature: str = "patch",
                 delay_load: bool = False, search_dirs: tuple[str | Path, ...] = ()):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        self.vision_tower_name = name_or_path
        self.path = resolve_tower_path(name_or_path, search_dirs)
        self.select_layer = select_layer
        self.select_feature = select_feature
        if delay_load:
            self.vision_tower = CLIPVisionModel(load_vision_config(self.path))
        else:
            self.vision_tower = CLIPVisionModel.from_pretrained(self.path)
        self.vision_tower.requires_grad_(False)
        self.image_processor = load_tower_image_processor(self.path, self.config.image_size)

    def load_pretrained_weights(self) -> None:
        """Replace the tower's weights with those of its own folder or hub repo."""
        pretrained = CLIPVisionModel.from_pretrained(self.path, dtype=self.dtype)
        self.vision_tower.load_state_dict(pretrained.state_dict())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        trainable = any(p.requires_grad for p in self.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            outputs = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
            features = outputs.hidden_states[self.select_layer]
            if self.select_feature == "patch":
                features = features[:, 1:]
        return features

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.embeddings.patch_embedding.weight.device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2
