"""Builders shared by the p-MoD model tests: tiny LLaVA / p-MoD models from configs, random weights."""

from __future__ import annotations

import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import anyres_grid_pinpoints, process_images
from llava.model import LlavaConfig, LlavaLlamaForCausalLM, PmodLlavaConfig, PmodLlavaLlamaForCausalLM

VISION_TOKENS_PER_IMAGE = 16  # tiny CLIP: 56 px images, 14 px patches


def tiny_config_kwargs(vision_tower: str | None, num_layers: int = 8, **overrides) -> dict:
    kwargs = dict(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.1,
        rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    if vision_tower is not None:
        kwargs.update(
            mm_vision_tower=vision_tower, mm_hidden_size=32, mm_projector_type="mlp2x_gelu",
            mm_vision_select_layer=-2, mm_vision_select_feature="patch", mm_patch_merge_type="flat",
            image_aspect_ratio="pad", tokenizer_padding_side="right",
        )
    kwargs.update(overrides)
    return kwargs


def build_pmod(vision_tower: str | None, num_layers: int = 8, schedule: str = "shiftedcos_decay_0.85_0.15",
               factor: float = 0.5, special_init: bool = False, seed: int = 0, weight_norm: str = "tanh_0.2_1",
               **overrides):
    config = PmodLlavaConfig(**tiny_config_kwargs(
        vision_tower, num_layers, mod_target_layers=schedule, mod_router_factor=factor,
        mod_weight_norm=weight_norm, mod_bias_enabled=True, mod_special_init=special_init,
        mod_target_token_type="vision_all", **overrides,
    ))
    torch.manual_seed(seed)
    return PmodLlavaLlamaForCausalLM(config).eval()


def dense_twin(pmod_model) -> LlavaLlamaForCausalLM:
    """A dense LLaVA model with the p-MoD model's weights (routers dropped, wrapper prefix removed)."""
    config_dict = pmod_model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "mod_target_layers", "mod_target_layer_indices"):
        config_dict.pop(key, None)
    config = LlavaConfig(**config_dict)
    dense = LlavaLlamaForCausalLM(config).eval()
    state = {
        key.replace(".decoder_layer.", "."): value
        for key, value in pmod_model.state_dict().items()
        if ".router." not in key
    }
    dense.load_state_dict(state)
    return dense


def random_images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 56, 56, generator=generator)


def right_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> right-padded ids and the bool attention mask."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = torch.tensor(prompt)
        mask[row, : len(prompt)] = True
    return ids, mask


def real_prefill_slots(cache, layer_idx: int) -> list[int]:
    """Real tokens each row of a compact cache layer holds from prefill (text + kept vision tokens)."""
    layer = cache.compact_layer(layer_idx)
    valid = layer.prefill_valid()
    if valid is None:
        return [layer.prefill_slots] * layer.keys.shape[0]
    return valid.sum(dim=1).tolist()


def mixed_prompts():
    """Three prompts with 0, 1 and 2 images (0, 16, 32 vision tokens) and different text lengths."""
    return [[1, 11, 12, 13, 14, 15, 16], [1, 21, -200, 22, 23], [1, -200, 31, 32, -200, 33, 34, 35, 36]]


def images_for(prompts, seed=0):
    """LLaVA convention: one image per image token, one dummy image per text-only prompt, in batch order."""
    count = sum(max(1, prompt.count(-200)) for prompt in prompts)
    return random_images(count, seed)


# LLaVA-NeXT (AnyRes) samples for the tiny CLIP
TILE = 56  # the session's tiny CLIP: 56 px, 4 x 4 tokens per tile

NEXT_PROMPTS = [
    [1, 5, IMAGE_TOKEN_INDEX, 6, 7, 8, 9],
    [1, IMAGE_TOKEN_INDEX, 10, 11, 12],
    [1, 13, IMAGE_TOKEN_INDEX, 14, 15, 16, 17, 18],
    [1, 20, 21, 22, 23, 24],  # text only: consumes a dummy image
]
NEXT_SIZES = [(112, 84), (40, 72), (150, 50), None]
# 16 base tokens + unpadded rows x (columns + newline): 2x2 grid cut to 6x8, 1x2 grid 8x4, 3x1 grid 4x12.
NEXT_VISION_TOKENS = [16 + 6 * 9, 16 + 8 * 5, 16 + 4 * 13, 0]


def next_pmod(tower, **overrides):
    """An 8-layer p-MoD model with AnyRes (4 tiles at most), spatial_unpad and a random image_newline."""
    model = build_pmod(
        tower, mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
        image_grid_pinpoints=anyres_grid_pinpoints(4, TILE), **overrides,
    )
    with torch.no_grad():
        model.get_model().image_newline.normal_(generator=torch.Generator().manual_seed(1))
    return model


def sample_images(processor, config):
    """Per sample: its [1 + tiles, 3, 56, 56] tensor, or a zero image for the text-only sample."""
    images = []
    for index, size in enumerate(NEXT_SIZES):
        if size is None:
            images.append(torch.zeros(3, TILE, TILE))
            continue
        color = (40 * index + 30, 200 - 50 * index, 90)
        image = Image.effect_noise(size, 60).convert("RGB")
        image.paste(color, (0, 0, size[0] // 2, size[1] // 2))
        images.append(process_images([image], processor, config)[0])
    return images
