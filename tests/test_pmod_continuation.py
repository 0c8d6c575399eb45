"""New tokens on a filled p-MoD cache: any number at once equals one at a time equals recomputation.

Compact layers hold fewer keys than tokens seen; each reports its own key length as the query offset to
transformers' masking, so a multi-token step (text after an image prompt, a second chat turn, chunked text)
masks exactly as a single-token step does. Covered for LLaVA-1.5 and NeXT, SDPA and eager attention, batch 1
and a left-padded batch of 2 with uneven kept lengths.
"""

from __future__ import annotations

import pytest
import torch
from pmod_testing import (
    NEXT_PROMPTS,
    NEXT_SIZES,
    build_pmod,
    images_for,
    mixed_prompts,
    next_pmod,
    random_images,
    sample_images,
)

import pmod.session
from llava.mm_utils import load_image_processor
from pmod.cache import PmodCache
from pmod.hf_compat import output_cache

pytestmark = pytest.mark.compat
NEW_TEXT = [[40, 41, 42, 43, 44], [50, 51, 52, 53, 54]]


def left_padded(prompts):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = True
    return ids, mask


def case(kind, tower, attn):
    """(model, prompts, images, image_sizes) for a batch of 2 whose rows keep different numbers of tokens."""
    if kind == "1.5":
        model = build_pmod(tower, attn_implementation=attn)
        prompts = mixed_prompts()[1:]
        return model, prompts, images_for(prompts), None
    model = next_pmod(tower, attn_implementation=attn)
    processor = load_image_processor(tower)
    return model, NEXT_PROMPTS[:2], sample_images(processor, model.config)[:2], NEXT_SIZES[:2]


def prefill(model, ids, mask, images, sizes):
    """A left-padded routed prefill (as generate() runs it); returns (cache, prepared inputs)."""
    with torch.no_grad():
        prepared = model.prepare_multimodal_inputs(ids, mask, None, images, sizes, padding_side="left")
        out = model(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask, use_cache=True,
                    **model.routing_inputs(prepared))
    return output_cache(out), prepared


@pytest.fixture(scope="module")
def tower(tiny_models):
    return tiny_models.vision_tower


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["1.5", "next"])
def test_text_after_an_image_prompt_in_one_forward_equals_steps_and_recomputation(tower, kind, attn):
    model, prompts, images, sizes = case(kind, tower, attn)
    ids, mask = left_padded(prompts)
    new = torch.tensor(NEW_TEXT)
    _, prepared = prefill(model, ids, mask, images, sizes)
    rows_kept = {tuple(kept) for kept in model.model.last_routing_stats.kept_vision.values()}
    assert any(len(set(kept)) > 1 for kept in rows_kept), "the two rows must keep different numbers of tokens"
    full_mask = torch.cat([prepared.attention_mask, torch.ones_like(new, dtype=torch.bool)], dim=1)

    chunk_cache, _ = prefill(model, ids, mask, images, sizes)
    with torch.no_grad():
        chunked = model(input_ids=new, attention_mask=full_mask, past_key_values=chunk_cache, use_cache=True).logits

    step_cache, _ = prefill(model, ids, mask, images, sizes)
    stepwise = []
    for step in range(new.shape[1]):
        width = prepared.attention_mask.shape[1] + step + 1
        with torch.no_grad():
            stepwise.append(model(input_ids=new[:, step:step + 1], attention_mask=full_mask[:, :width],
                                  past_key_values=step_cache, use_cache=True).logits)
    stepwise = torch.cat(stepwise, dim=1)

    # Recomputation: the whole sequence from scratch; the new text joins the prompt (kept by every layer).
    embeds = torch.cat([prepared.inputs_embeds, model.get_model().embed_tokens(new)], dim=1)
    targets = torch.cat([prepared.target_mask, torch.zeros_like(new, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        recomputed = model(inputs_embeds=embeds, attention_mask=full_mask, mod_target_mask=targets,
                           use_cache=False).logits[:, -new.shape[1]:]

    torch.testing.assert_close(chunked, stepwise, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(chunked, recomputed, atol=2e-5, rtol=1e-4)
    assert [chunk_cache.layers[i].get_seq_length() for i in range(8)] == \
        [step_cache.layers[i].get_seq_length() for i in range(8)]


@pytest.mark.parametrize("kind", ["1.5", "next"])
def test_generate_continues_a_returned_cache_like_a_fresh_start(tower, kind):
    """A second chat turn: the whole conversation (same images) with the first turn's cache."""
    model, prompts, images, sizes = case(kind, tower, "sdpa")
    ids, mask = left_padded(prompts)
    first = model.generate(ids, attention_mask=mask, images=images, image_sizes=sizes, max_new_tokens=3,
                           min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    answer = first.sequences
    turn = torch.tensor(NEW_TEXT)
    conversation = torch.cat([ids, answer, turn], dim=1)
    conversation_mask = torch.cat([mask, torch.ones_like(answer, dtype=torch.bool),
                                   torch.ones_like(turn, dtype=torch.bool)], dim=1)
    kwargs = dict(attention_mask=conversation_mask, images=images, image_sizes=sizes, max_new_tokens=4,
                  min_new_tokens=4, do_sample=False)
    continued = model.generate(conversation, past_key_values=output_cache(first), **kwargs)
    fresh = model.generate(conversation, **kwargs)
    assert continued.tolist() == fresh.tolist()


def test_a_new_image_on_a_filled_cache_is_refused(tower):
    model = build_pmod(tower)
    prompt = torch.tensor([[1, -200, 31, 32]])
    out = model(input_ids=prompt, images=random_images(1), use_cache=True)
    second_turn = torch.cat([prompt, torch.tensor([[33, -200, 34]])], dim=1)
    with pytest.raises(NotImplementedError, match="tokens that continue a filled cache must be text"):
        model.generate(second_turn, images=random_images(2), past_key_values=output_cache(out), max_new_tokens=1)


def test_a_mask_that_does_not_cover_the_cache_is_refused(tower):
    model = build_pmod(tower)
    out = model(input_ids=torch.tensor([[1, -200, 31, 32]]), images=random_images(1), use_cache=True)
    with pytest.raises(ValueError, match="must cover the"):
        model(input_ids=torch.tensor([[40, 41]]), attention_mask=torch.ones(1, 2, dtype=torch.bool),
              past_key_values=output_cache(out))


def test_each_kept_length_pattern_builds_one_mask_per_step(tower, monkeypatch):
    """Layers that kept the same lengths share a decode mask, built once per step, not once per layer."""
    model = build_pmod(tower)
    prompts = mixed_prompts()[1:]
    ids, mask = left_padded(prompts)
    cache, prepared = prefill(model, ids, mask, images_for(prompts), None)
    patterns = {cache.compact_layer(i).pattern for i in model.model.schedule.mod_layers}
    assert len(patterns) < len(model.model.schedule.mod_layers)
    built = []
    original = pmod.session.create_causal_mask
    monkeypatch.setattr(pmod.session, "create_causal_mask",
                        lambda **kwargs: built.append(kwargs["layer_idx"]) or original(**kwargs))
    step_mask = torch.cat([prepared.attention_mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        model(input_ids=torch.tensor([[40], [41]]), attention_mask=step_mask, past_key_values=cache)
    assert len(built) == len(patterns)


def test_uneven_batch_decode_reads_no_device_value_on_the_host():
    """On the meta device any data-dependent host read (.item(), .all() in an if, nonzero) raises."""
    from pmod.routing import TokenCounts

    model = build_pmod(None).to("meta")
    embeds = torch.empty(2, 12, 64, device="meta")
    targets = torch.empty(2, 12, dtype=torch.bool, device="meta")
    counts = TokenCounts(n_target=(8, 3), n_valid=(12, 12))
    cache = PmodCache(config=model.config)
    with torch.no_grad():
        model(inputs_embeds=embeds, mod_target_mask=targets, token_counts=counts, past_key_values=cache,
              use_cache=True)
        assert cache.compact_layer(model.model.schedule.mod_layers[-1]).row_lengths is not None
        for _ in range(2):
            out = model(input_ids=torch.zeros(2, 1, dtype=torch.long, device="meta"), past_key_values=cache,
                        use_cache=True)
    assert out.logits.shape == (2, 1, 300) and out.logits.is_meta


def test_generate_with_images_needs_the_cache(tower):
    model = build_pmod(tower)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(torch.tensor([[1, -200, 31]]), images=random_images(1), use_cache=False, max_new_tokens=2)
