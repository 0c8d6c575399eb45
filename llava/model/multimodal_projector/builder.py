"""Vision-to-language projectors: ``linear``, ``mlp{N}x_gelu`` and ``identity`` (LLaVA's names and key layout)."""

from __future__ import annotations

import re

from torch import nn


def build_vision_projector(config) -> nn.Module:
    kind = getattr(config, "mm_projector_type", "linear")
    vision_size, text_size = config.mm_hidden_size, config.hidden_size
    if kind == "linear":
        return nn.Linear(vision_size, text_size)
    if kind == "identity":
        return nn.Identity()
    match = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if match and int(match.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(vision_size, text_size)]
        for _ in range(int(match.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(text_size, text_size)]
        return nn.Sequential(*layers)
    raise ValueError(f"Unknown --mm_projector_type {kind!r}: use linear, identity or mlp<N>x_gelu (e.g. mlp2x_gelu)")
