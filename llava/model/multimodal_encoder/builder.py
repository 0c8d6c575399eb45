"""Build the vision tower named in a LLaVA config (``mm_vision_tower``) or in training arguments."""

from __future__ import annotations

from pathlib import Path

from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower


def build_vision_tower(config, delay_load: bool = False, search_dirs: tuple[str | Path, ...] = ()) -> CLIPVisionTower:
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if not name:
        raise ValueError("No vision tower given: set --vision_tower (training) or mm_vision_tower (config)")
    return CLIPVisionTower(
        name,
        select_layer=getattr(config, "mm_vision_select_layer", -2),
        select_feature=getattr(config, "mm_vision_select_feature", "patch"),
        delay_load=delay_load,
        search_dirs=search_dirs,
    )
