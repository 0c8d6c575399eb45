"""The transformers-native VLM classes p-MoD supports, and where each keeps what p-MoD needs.

All of them keep their decoder layers at ``model.model.language_model.layers`` (Llama, Qwen2 or Qwen2-VL text
layers: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``, and merged RoPE
``(cos, sin)`` as ``position_embeddings``) and mark the positions they fill with visual features by
``config.image_token_id`` (and ``video_token_id`` for the families that take videos).
"""

from __future__ import annotations

from torch import nn

SUPPORTED_ARCHITECTURES = (
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
)
PMOD_PREFIX = "Pmod"


def base_architecture(model_or_class) -> str:
    """The supported transformers class a model (or class) is, or derives from; a clear error otherwise."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    for ancestor in cls.__mro__:
        if ancestor.__name__ in SUPPORTED_ARCHITECTURES:
            return ancestor.__name__
    raise ValueError(f"p-MoD does not support {cls.__name__}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def text_layers(model) -> nn.ModuleList:
    return model.model.language_model.layers


def visual_token_ids(config) -> tuple[int, ...]:
    """The ids of the image (and video) placeholder tokens the model fills with visual features."""
    ids = [getattr(config, name, None) for name in ("image_token_id", "video_token_id")]
    return tuple(i for i in ids if i is not None)
