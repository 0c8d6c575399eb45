"""p-MoD-LLaVA-NeXT on a tiny model: an AnyRes batch (images of different sizes plus a text-only sample) trains
with the gradients of its samples taken one by one, and cached greedy generation of an AnyRes batch equals
recomputation from scratch."""

from __future__ import annotations

import pytest
import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import load_image_processor
from pmod.cache import PmodCache
from pmod.hf_compat import output_cache
from pmod_testing import (
    NEXT_PROMPTS as PROMPTS,
    NEXT_SIZES as SIZES,
    NEXT_VISION_TOKENS as VISION_TOKENS,
    next_pmod,
    real_prefill_slots,
    right_padded,
    sample_images,
)

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def tower(tiny_models):
    return tiny_models.vision_tower


@pytest.fixture(scope="module")
def processor(tower):
    return load_image_processor(tower)


def labels_for(ids, mask):
    """Every text token but BOS is a label (image tokens and padding are ignored)."""
    labels = torch.where(mask & (ids != IMAGE_TOKEN_INDEX), ids, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    return labels


def summed_loss(model, prompts, images, sizes):
    """Sum (not mean) of the token losses: the model's mean loss times its number of predicted labels."""
    ids, mask = right_padded(prompts)
    labels = labels_for(ids, mask)
    predicted = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return model(input_ids=ids, attention_mask=mask, labels=labels, images=images, image_sizes=sizes).loss * predicted


def gradients(model):
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_anyres_batch_gradients_equal_the_sum_of_per_sample_gradients(tower, processor):
    model = next_pmod(tower).train()
    images = sample_images(processor, model.config)
    assert [image.shape[0] for image in images] == [5, 3, 4, 3]

    model.zero_grad()
    summed_loss(model, PROMPTS, images, SIZES).backward()
    batched = gradients(model)
    stats = model.model.last_routing_stats
    assert list(stats.n_vision) == VISION_TOKENS
    assert any(kept[0] < VISION_TOKENS[0] for kept in stats.kept_vision.values()), "p-MoD must drop tokens"

    model.zero_grad()
    for prompt, image, size in zip(PROMPTS, images, SIZES):
        summed_loss(model, [prompt], [image], [size]).backward()
    per_sample = gradients(model)

    assert batched.keys() == per_sample.keys()
    assert any("router" in name for name in batched) and "model.image_newline" in batched
    assert batched["model.image_newline"].abs().sum() > 0
    for name in batched:
        torch.testing.assert_close(batched[name], per_sample[name], atol=2e-5, rtol=1e-4, msg=name)


def greedy_without_cache(model, prompt, image, size, steps):
    tokens = []
    for _ in range(steps):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = model(input_ids=ids, images=[image], image_sizes=[size], use_cache=False).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


def test_cached_greedy_generation_of_an_anyres_batch_equals_recomputation(tower, processor):
    model = next_pmod(tower)
    prompts, sizes = PROMPTS[:2], SIZES[:2]
    images = sample_images(processor, model.config)[:2]
    expected = [greedy_without_cache(model, p, im, s, 5) for p, im, s in zip(prompts, images, sizes)]

    ids, mask = right_padded(prompts)
    result = model.generate(ids, attention_mask=mask, images=images, image_sizes=sizes, max_new_tokens=5,
                            min_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert result.sequences.tolist() == expected

    cache = output_cache(result)
    assert isinstance(cache, PmodCache)
    n_text = [len(p) - 1 for p in prompts]
    schedule = model.model.schedule
    for layer in schedule.mod_layers:
        kept = [n_text[b] + schedule.keep_count(layer, VISION_TOKENS[b]) for b in range(2)]
        assert real_prefill_slots(cache, layer) == kept
