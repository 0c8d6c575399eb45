"""Preallocated cache buffers (GrowableLayer) hold what transformers' concatenating DynamicLayer holds, through
growth, beam reordering, batch repeats and selections, cropping and reset; and generation with them gives the
tokens of the concatenating cache: greedy, seeded sampling and beam search, for the LLaVA model and pmod.hf."""

from __future__ import annotations

import pytest
import torch
from hf_vlm_testing import Sample, tiny_vlm, vlm_inputs, with_random_routers
from pmod_testing import NEXT_PROMPTS, NEXT_SIZES, next_pmod, sample_images
from transformers.cache_utils import DynamicLayer

from llava.mm_utils import load_image_processor
from pmod.cache import CompactLayer, GrowableLayer, PmodCache
from pmod.hf import apply_pmod
from pmod.hf_compat import output_cache

pytestmark = pytest.mark.compat


def states(batch, length, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, length, 4, generator=generator),
            torch.randn(batch, 2, length, 4, generator=generator))


def assert_same(layer, reference):
    torch.testing.assert_close(layer.keys, reference.keys, atol=0, rtol=0)
    torch.testing.assert_close(layer.values, reference.values, atol=0, rtol=0)
    assert layer.get_seq_length() == reference.get_seq_length()


def test_growable_layer_holds_what_concatenation_holds(monkeypatch):
    monkeypatch.setattr(GrowableLayer, "MIN_GROWTH", 3)  # grow every few steps
    layer, reference = GrowableLayer(), DynamicLayer()
    for step, length in enumerate([5, 1, 1, 1, 1, 2, 1, 4, 1]):
        new = states(3, length, step)
        keys, values = layer.update(*new)
        reference.update(*new)
        assert_same(layer, reference)
        assert keys.data_ptr() == layer._buffers[0].data_ptr(), "the keys must be a view of the buffer"
    assert layer._buffers[0].shape[-2] < 2 * layer.get_seq_length() + 3
    for operation, argument in [("reorder_cache", torch.tensor([2, 0, 0])), ("batch_repeat_interleave", 2),
                                ("batch_select_indices", torch.tensor([0, 3, 5])), ("crop", -2)]:
        getattr(layer, operation)(argument)
        getattr(reference, operation)(argument)
        assert_same(layer, reference)
        new = states(reference.keys.shape[0], 1, 99)
        layer.update(*new)
        reference.update(*new)
        assert_same(layer, reference)
    layer.reset()
    reference.reset()  # drops the keys from transformers 5.24 on, zeroes them before
    assert layer.get_seq_length() == reference.get_seq_length() and layer._buffers is None


def test_keys_that_need_gradients_are_concatenated():
    layer = GrowableLayer()
    keys, values = states(1, 3, 0)
    layer.update(keys.requires_grad_(), values)
    assert layer._buffers is None and layer.keys.requires_grad


def test_the_cache_preallocates_every_full_attention_layer_unless_told_not_to():
    config = apply_pmod(tiny_vlm("qwen2_5_vl")).config.get_text_config()
    kinds = [type(layer) for layer in PmodCache(config=config).layers]
    assert kinds == [GrowableLayer, GrowableLayer, CompactLayer, CompactLayer, CompactLayer, CompactLayer]
    plain = PmodCache(config=config, preallocate=False)
    assert [type(layer).__name__ for layer in plain.layers][:2] == ["DynamicLayer", "DynamicLayer"]
    assert all(type(layer).__name__ == "ConcatenatingCompactLayer" for layer in plain.layers[2:])


DECODING = {"greedy": dict(do_sample=False), "sampling": dict(do_sample=True, top_k=20, temperature=1.5),
            "beams": dict(do_sample=False, num_beams=3)}


def generate(model, inputs, cache, decoding):
    torch.manual_seed(3)
    return model.generate(**inputs, past_key_values=cache, max_new_tokens=6, min_new_tokens=6,
                          return_dict_in_generate=True, **DECODING[decoding])


@pytest.mark.parametrize("decoding", sorted(DECODING))
def test_llava_generation_with_buffers_equals_concatenation(tiny_models, decoding, monkeypatch):
    monkeypatch.setattr(GrowableLayer, "MIN_GROWTH", 2)  # buffers grow during decoding too
    model = next_pmod(tiny_models.vision_tower)
    images = sample_images(load_image_processor(tiny_models.vision_tower), model.config)[:2]
    width = max(map(len, NEXT_PROMPTS[:2]))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.bool)
    for row, prompt in enumerate(NEXT_PROMPTS[:2]):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = True
    inputs = dict(inputs=ids, attention_mask=mask, images=images, image_sizes=NEXT_SIZES[:2])
    config = model.config
    buffered = generate(model, inputs, PmodCache(config=config), decoding)
    concatenated = generate(model, inputs, PmodCache(config=config, preallocate=False), decoding)
    assert buffered.sequences.tolist() == concatenated.sequences.tolist()
    assert output_cache(buffered).layers[2]._buffers is not None


@pytest.mark.parametrize("decoding", sorted(DECODING))
def test_pmod_hf_generation_with_buffers_equals_concatenation(decoding, monkeypatch):
    monkeypatch.setattr(GrowableLayer, "MIN_GROWTH", 2)
    model = with_random_routers(apply_pmod(tiny_vlm("qwen2_5_vl"), zero_init=False))
    samples = [Sample([1, 5], [7, 8, 9], image_sizes=((84, 56),)), Sample([1, 11, 12, 13], [14],
                                                                          image_sizes=((56, 112),))]
    inputs = vlm_inputs(model, "qwen2_5_vl", samples)
    config = model.config.get_text_config()
    buffered = generate(model, inputs, PmodCache(config=config), decoding)
    concatenated = generate(model, inputs, PmodCache(config=config, preallocate=False), decoding)
    assert buffered.sequences.tolist() == concatenated.sequences.tolist()
