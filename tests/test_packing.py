"""Packed sequences: p-MoD layers on packed kept tokens, and padding-free (``--packing``) training batches.

Every equality is against the padded layout the model has always used, in float32.
"""

from __future__ import annotations

import pytest
import torch
from pmod_testing import build_pmod, dense_twin, images_for, mixed_prompts, right_padded

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from pmod.hf_compat import output_cache, set_activation_checkpointing
from pmod.packing import (
    PACKED_PREFIX,
    PackedSequences,
    TokenRows,
    check_packed_attention,
    enable_packed_attention,
    packed_attention,
    packed_kernel_name,
)

pytestmark = pytest.mark.compat
ATOL = 2e-5


def labelled(prompts):
    ids, mask = right_padded(prompts)
    labels = ids.masked_fill(~mask | (ids == IMAGE_TOKEN_INDEX), IGNORE_INDEX)
    return ids, mask, labels


def uneven_prompts():
    """Four samples: text only, one image, two images, one image after long text (uneven kept lengths)."""
    return mixed_prompts() + [[1] + list(range(40, 52)) + [IMAGE_TOKEN_INDEX, 60, 61]]


def expanded_mask(model) -> torch.Tensor:
    """The right-padded attention mask of the last prepared batch (after image expansion)."""
    lengths = torch.tensor(model.last_token_counts.n_valid)
    return torch.arange(int(lengths.max()))[None] < lengths[:, None]


def loss_and_grads(model, prompts, pack: bool):
    model.zero_grad(set_to_none=True)
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a LoRA wrapper
    llava.pack_sequences = pack
    ids, mask, labels = labelled(prompts)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, images=images_for(prompts), use_cache=False)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def assert_same_grads(padded, packed):
    assert padded.keys() == packed.keys()
    for name, grad in padded.items():
        torch.testing.assert_close(packed[name], grad, atol=ATOL, rtol=1e-4, msg=name)


@pytest.fixture
def pmod_model(tiny_models):
    model = build_pmod(tiny_models.vision_tower, factor=0.5)
    enable_packed_attention(model.config)
    return model.train()


def test_packed_attention_keeps_samples_apart():
    generator = torch.Generator().manual_seed(0)
    lengths = (5, 1, 9)
    q, k, v = (torch.randn(1, h, sum(lengths), 8, generator=generator) for h in (4, 2, 2))
    sequences = PackedSequences.from_lengths(lengths, torch.device("cpu"))
    out = packed_attention(q, k, v, sequences)
    assert out.shape == (1, sum(lengths), 4, 8)
    for start, end in zip(sequences.offsets, sequences.offsets[1:]):
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], is_causal=True, enable_gqa=True
        ).transpose(1, 2)
        torch.testing.assert_close(out[:, start:end], alone)
    assert packed_kernel_name(torch.device("cpu"), torch.float32) == "per-sample SDPA"
    with pytest.raises(ValueError, match="holds 10 tokens but its samples add up to 15"):
        packed_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], sequences)


def test_token_rows_round_trip():
    sequences = PackedSequences.from_lengths((3, 5, 2), torch.device("cpu"))
    rows = TokenRows.packed(sequences, torch.device("cpu"))
    flat = torch.arange(10.0)
    as_rows = rows.to_rows(flat)
    assert as_rows.shape == (3, 5)
    assert as_rows[1].tolist() == [3, 4, 5, 6, 7]
    assert rows.valid.sum(dim=1).tolist() == [3, 5, 2]
    assert torch.equal(rows.to_flat(as_rows), flat)
    assert rows.row_offsets.tolist() == [0, 3, 8]


def test_uneven_batch_runs_packed_layers_equal_to_padded(tiny_models):
    """Uneven rows run each p-MoD layer's kept tokens packed (with or without a cache) and compute exactly the
    real kept tokens; logits, the compact cache and greedy tokens equal the padded compact layout's."""
    model = build_pmod(tiny_models.vision_tower, factor=0.5)
    llm = model.get_model()
    prompts = uneven_prompts()
    ids, mask = right_padded(prompts)
    images = images_for(prompts)
    tokens_per_layer = {}

    def count(index):
        def hook(module, args):
            tokens_per_layer[index] = args[0].shape[0] * args[0].shape[1]
        return hook

    def run():
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, images=images, use_cache=False).logits
            counted = dict(tokens_per_layer)
            cache = output_cache(model(input_ids=ids, attention_mask=mask, images=images, use_cache=True))
            tokens = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4, do_sample=False)
        return logits, counted, cache, tokens

    handles = [llm.layers[i].decoder_layer.mlp.register_forward_pre_hook(count(i)) for i in llm.schedule.mod_layers]
    packed, packed_tokens, packed_cache, packed_generated = run()
    stats = llm.last_routing_stats
    llm.pack_kept_tokens = False
    padded, padded_tokens, padded_cache, padded_generated = run()
    for handle in handles:
        handle.remove()
    real = expanded_mask(model)
    torch.testing.assert_close(packed[real], padded[real], atol=ATOL, rtol=1e-4)
    assert torch.equal(packed_generated, padded_generated)
    n_text = [valid - target for valid, target in zip(model.last_token_counts.n_valid, stats.n_vision)]
    for index, kept in stats.kept_vision.items():
        lengths = [t + k for t, k in zip(n_text, kept)]
        assert packed_tokens[index] == sum(lengths)  # no padding computed
        assert padded_tokens[index] == len(prompts) * max(lengths)
        packed_layer, padded_layer = packed_cache.layers[index], padded_cache.layers[index]
        assert packed_layer.pattern == padded_layer.pattern == tuple(lengths)
        slots = packed_layer.prefill_valid()
        torch.testing.assert_close(packed_layer.keys.transpose(1, 2)[slots], padded_layer.keys.transpose(1, 2)[slots],
                                   atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("weight_norm", ["tanh_0.2_1", "softmax_0.2_1"])
def test_packed_batch_equals_padded_loss_and_gradients(tiny_models, weight_norm):
    """Loss, every gradient (routers, projector, LLM) of a packed batch equal the padded batch's."""
    model = build_pmod(tiny_models.vision_tower, factor=0.5, weight_norm=weight_norm)
    enable_packed_attention(model.config)
    model.train()
    prompts = uneven_prompts()
    padded_loss, padded_grads = loss_and_grads(model, prompts, pack=False)
    packed_loss, packed_grads = loss_and_grads(model, prompts, pack=True)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-6)
    assert any(".router." in name for name in packed_grads)
    assert_same_grads(padded_grads, packed_grads)


def test_packed_dense_model_equals_padded(tiny_models):
    dense = dense_twin(build_pmod(tiny_models.vision_tower))
    dense.enable_sequence_packing()
    dense.train()
    prompts = uneven_prompts()
    padded_loss, padded_grads = loss_and_grads(dense, prompts, pack=False)
    packed_loss, packed_grads = loss_and_grads(dense, prompts, pack=True)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-6)
    assert_same_grads(padded_grads, packed_grads)


def test_packing_with_gradient_checkpointing(pmod_model):
    prompts = uneven_prompts()
    padded_loss, padded_grads = loss_and_grads(pmod_model, prompts, pack=False)
    set_activation_checkpointing(pmod_model, True)
    packed_loss, packed_grads = loss_and_grads(pmod_model, prompts, pack=True)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-6)
    assert_same_grads(padded_grads, packed_grads)


def test_packing_with_lora(pmod_model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(pmod_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    prompts = uneven_prompts()
    padded_loss, padded_grads = loss_and_grads(peft_model, prompts, pack=False)
    packed_loss, packed_grads = loss_and_grads(peft_model, prompts, pack=True)
    assert padded_grads and all("lora_" in name for name in padded_grads)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-6, rtol=1e-6)
    assert_same_grads(padded_grads, packed_grads)


def test_packed_input_needs_packing_aware_attention(tiny_models):
    model = build_pmod(tiny_models.vision_tower).train()
    model.pack_sequences = True  # without enable_sequence_packing: stock attention would mix the samples
    prompts = uneven_prompts()
    ids, mask, labels = labelled(prompts)
    with pytest.raises(ValueError, match="enable_packed_attention"):
        model(input_ids=ids, attention_mask=mask, labels=labels, images=images_for(prompts))
    with pytest.raises(ValueError, match="attn_implementation sdpa or flash_attention_2, got 'eager'"):
        enable_packed_attention(build_pmod(tiny_models.vision_tower, attn_implementation="eager").config)
    check_packed_attention(type("Config", (), {"_attn_implementation": PACKED_PREFIX + "sdpa"})())


def test_packed_model_still_runs_padded_batches_and_generates(pmod_model):
    """Switching a model to the packing-aware attention leaves padded forwards and generation unchanged."""
    pmod_model.eval()
    prompts = uneven_prompts()
    ids, mask = right_padded(prompts)
    images = images_for(prompts)
    with torch.no_grad():
        before = pmod_model(input_ids=ids, attention_mask=mask, images=images, use_cache=True).logits
        tokens = pmod_model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4, do_sample=False)
    pmod_model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        reference = pmod_model(input_ids=ids, attention_mask=mask, images=images, use_cache=True).logits
        reference_tokens = pmod_model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4,
                                               do_sample=False)
    real = expanded_mask(pmod_model)
    torch.testing.assert_close(before[real], reference[real])
    assert torch.equal(tokens, reference_tokens)
