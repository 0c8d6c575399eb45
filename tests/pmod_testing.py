"""Builders shared by the p-MoD model tests: tiny LLaVA / p-MoD models from configs, random weights."""

from __future__ import annotations

import torch

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
               factor: float = 0.5, special_init: bool = False, seed: int = 0, **overrides):
    config = PmodLlavaConfig(**tiny_config_kwargs(
        vision_tower, num_layers, mod_target_layers=schedule, mod_router_factor=factor,
        mod_weight_norm="tanh_0.2_1", mod_bias_enabled=True, mod_special_init=special_init,
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
