"""p-MoD model behaviour on tiny random models: equivalences, official keep counts, a slow reference,
cached generation, batching, save/load and bad configs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from llava.model import PmodLlavaConfig
from llava.model.builder import load_pretrained_model
from pmod.cache import PmodCache
from pmod.hf_compat import output_cache, set_activation_checkpointing
from pmod.layer import PmodDecoderLayer
from pmod.schedule import keep_count
from pmod_testing import (
    VISION_TOKENS_PER_IMAGE,
    build_pmod,
    dense_twin,
    images_for,
    mixed_prompts,
    real_prefill_slots,
    right_padded,
    tiny_config_kwargs,
)

pytestmark = pytest.mark.compat
OFFICIAL_KEEP_576 = {
    0.5: [576] * 8 + [486, 464, 440, 414, 388, 360, 331, 302, 273, 244, 215, 187, 161, 135, 111, 89] + [86] * 8,
    0.4: [576] * 5 + [482, 466, 448, 428, 406, 382, 357, 330, 302, 274, 244, 215, 186, 158, 130, 103] + [86] * 11,
    0.3: [460, 459, 454, 447, 437, 424, 409, 391, 371, 349, 325, 299, 272, 244, 216, 187, 158, 129, 100] + [86] * 13,
}


@pytest.fixture(scope="module")
def tower(tiny_models):
    return tiny_models.vision_tower


def test_zero_routers_and_full_ratio_equal_the_dense_model(tower):
    model = build_pmod(tower, schedule="constant", factor=1.0, special_init=True)
    assert len(model.model.schedule.mod_layers) == 8
    dense = dense_twin(model)
    ids, mask = right_padded(mixed_prompts())
    images = images_for(mixed_prompts())
    with torch.no_grad():
        routed = model(input_ids=ids, attention_mask=mask, images=images).logits
        reference = dense(input_ids=ids, attention_mask=mask, images=images).logits
        valid = model.prepare_multimodal_inputs(ids, mask, None, images).attention_mask
    assert model.model.last_routing_stats.n_vision == (0, 16, 32)
    torch.testing.assert_close(routed[valid], reference[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("beta", sorted(OFFICIAL_KEEP_576))
def test_official_keep_counts_and_cache_lengths(beta):
    model = build_pmod(None, num_layers=32, factor=beta)
    n_text, n_vision = 9, 576
    embeds = torch.randn(1, n_text + n_vision, 64)
    targets = torch.zeros(1, n_text + n_vision, dtype=torch.bool)
    targets[0, 4 : 4 + n_vision] = True
    with torch.no_grad():
        output = model(inputs_embeds=embeds, mod_target_mask=targets, use_cache=True)
    stats = model.model.last_routing_stats
    kept = [stats.kept_vision.get(layer, (n_vision,))[0] for layer in range(32)]
    assert kept == OFFICIAL_KEEP_576[beta]
    cache = output_cache(output)
    assert [cache.layers[i].get_seq_length() for i in range(32)] == [n_text + k for k in kept]
    if beta == 0.5:
        assert model.model.schedule.mean_ratio() == pytest.approx(0.5375, abs=5e-5)


def reference_forward(model, embeds, target_mask):
    """Slow p-MoD forward of ONE unpadded sample, token by token from the paper's equations."""
    llm = model.model
    schedule = llm.schedule
    hidden = embeds
    positions = torch.arange(hidden.shape[0])[None]
    for index, layer in enumerate(llm.layers):
        if not isinstance(layer, PmodDecoderLayer):
            hidden = layer(hidden[None], attention_mask=None,
                           position_embeddings=llm.rotary_emb(hidden[None], positions))[0]
            continue
        block = layer.decoder_layer
        logits = layer.router(hidden)
        weights = layer.weight_norm(logits)
        targets = [t for t in range(hidden.shape[0]) if target_mask[t]]
        k = keep_count(len(targets), schedule.ratios[index])
        chosen = sorted(targets, key=lambda t: -float(logits[t].detach()))[:k]
        kept = [t for t in range(hidden.shape[0]) if t in chosen or not target_mask[t]]
        x = hidden[kept][None]
        rope = llm.rotary_emb(x, torch.tensor(kept)[None])
        attn, _ = block.self_attn(block.input_layernorm(x), attention_mask=None, position_embeddings=rope)
        residual = (x + attn)[0]
        mlp = block.mlp(block.post_attention_layernorm(residual[None]))[0]
        rows = []
        for t in range(hidden.shape[0]):
            if t in kept:
                j = kept.index(t)
                scale = weights[t] if target_mask[t] else 1.0
                rows.append(residual[j] + scale * mlp[j])
            else:
                rows.append(weights[t] * hidden[t])
        hidden = torch.stack(rows)
    return model.lm_head(llm.norm(hidden))


def test_batched_routing_equals_slow_reference_forward_and_gradients():
    torch.manual_seed(0)
    model = build_pmod(None, num_layers=6)
    lengths, vision = [14, 11, 8], [(2, 9), (1, 4), (3, 5)]  # (start, count) of each sample's vision tokens
    embeds = torch.randn(3, 14, 64)
    mask = torch.zeros(3, 14, dtype=torch.bool)
    targets = torch.zeros(3, 14, dtype=torch.bool)
    for row, (length, (start, count)) in enumerate(zip(lengths, vision)):
        mask[row, :length] = True
        targets[row, start : start + count] = True
    probe = torch.randn(3, 14, model.config.vocab_size)

    batched_embeds = embeds.clone().requires_grad_(True)
    logits = model(inputs_embeds=batched_embeds, attention_mask=mask, mod_target_mask=targets, use_cache=False).logits
    (logits * probe * mask[..., None]).sum().backward()
    batched_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    reference_loss = 0
    reference_embeds = embeds.clone().requires_grad_(True)
    for row, length in enumerate(lengths):
        ref_logits = reference_forward(model, reference_embeds[row, :length], targets[row, :length])
        torch.testing.assert_close(logits[row, :length], ref_logits, atol=2e-5, rtol=0)
        reference_loss = reference_loss + (ref_logits * probe[row, :length]).sum()
    reference_loss.backward()

    router_grads = [name for name in batched_grads if ".router." in name]
    assert router_grads and all(batched_grads[name].abs().sum() > 0 for name in router_grads)
    reference_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert reference_grads.keys() == batched_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(batched_grads[name], grad, atol=5e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(batched_embeds.grad, reference_embeds.grad, atol=5e-5, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tower):
    model = build_pmod(tower)
    ids, mask = right_padded(mixed_prompts())
    images, labels = images_for(mixed_prompts()), ids.masked_fill(~mask, -100).clamp(min=-100)
    labels[labels == -200] = -100

    def grads():
        model.zero_grad()
        model(input_ids=ids, attention_mask=mask, images=images, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.train()
    plain = grads()
    set_activation_checkpointing(model, True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], atol=1e-6, rtol=1e-5, msg=name)


def greedy_without_cache(model, prompt, images, steps):
    tokens = []
    for _ in range(steps):
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = model(input_ids=ids, images=images, use_cache=False).logits
        tokens.append(int(logits[0, -1].argmax()))
    return tokens


@pytest.mark.parametrize("beta", [0.5, 0.3])
def test_cached_greedy_generation_equals_recomputation(tower, beta):
    """Batch 1 and a left-padded batch of 3; beta 0.3 makes layer 0 a p-MoD layer (the official code crashes)."""
    model = build_pmod(tower, factor=beta)
    prompts = mixed_prompts()
    images = images_for(prompts)
    per_sample_images = [images[0:1], images[1:2], images[2:4]]
    expected = [greedy_without_cache(model, p, im, 5) for p, im in zip(prompts, per_sample_images)]

    single = model.generate(torch.tensor([prompts[2]]), images=per_sample_images[2], max_new_tokens=5,
                            do_sample=False, min_new_tokens=5)
    assert single[0].tolist() == expected[2]

    ids, mask = right_padded(prompts)
    result = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=5, min_new_tokens=5,
                            do_sample=False, return_dict_in_generate=True)
    assert result.sequences.tolist() == expected

    cache = output_cache(result)
    assert isinstance(cache, PmodCache)
    n_vision = [0, VISION_TOKENS_PER_IMAGE, 2 * VISION_TOKENS_PER_IMAGE]
    n_text = [len(p) - p.count(-200) for p in prompts]
    for layer in model.model.schedule.mod_layers:
        kept = [n_text[b] + model.model.schedule.keep_count(layer, n_vision[b]) for b in range(3)]
        assert real_prefill_slots(cache, layer) == kept
        assert cache.layers[layer].get_seq_length() == max(kept) + 4  # the last new token is not fed back


def test_sampling_and_beam_search_on_batches(tower):
    model = build_pmod(tower)
    prompts = mixed_prompts()
    ids, mask = right_padded(prompts)
    images = images_for(prompts)
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4, min_new_tokens=4,
                             do_sample=True, top_k=20)
    assert sampled.shape == (3, 4)

    beams = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4, min_new_tokens=4,
                           num_beams=3, do_sample=False)
    per_sample_images = [images[0:1], images[1:2], images[2:4]]
    for row, (prompt, image) in enumerate(zip(prompts, per_sample_images)):
        alone = model.generate(torch.tensor([prompt]), images=image, max_new_tokens=4, min_new_tokens=4,
                               num_beams=3, do_sample=False)
        assert beams[row].tolist() == alone[0].tolist()


def test_save_and_reload_round_trip(tiny_models, tower, tmp_path):
    model = build_pmod(tower)
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_models.llm).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "pmod_llava_llama"
    assert saved["mod_target_layers"] == "shiftedcos_decay_0.85_0.15"
    assert saved["mod_target_layer_indices"] == list(model.model.schedule.mod_layers)
    _, loaded, image_processor, _ = load_pretrained_model(str(tmp_path), dtype=torch.float32)
    assert image_processor is not None
    ids, mask = right_padded(mixed_prompts())
    images = images_for(mixed_prompts())
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, images=images).logits
        after = loaded(input_ids=ids, attention_mask=mask, images=images).logits
    torch.testing.assert_close(before, after, atol=0, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mod_target_layers="bogus_schedule"), "--mod_target_layers"),
        (dict(mod_router_factor=float("nan")), "--mod_router_factor"),
        (dict(mod_target_layers="shiftedcos_decay_1.5_0.15"), "(0, 1]"),
        (dict(mod_weight_norm=None), "--mod_weight_norm"),
        (dict(mod_weight_norm="tanh_x_1"), "--mod_weight_norm"),
        (dict(mod_target_layer_indices=list(range(8, 32))), "mod_target_layer_indices"),
    ],
)
def test_bad_config_is_rejected_before_weights_exist(overrides, message):
    kwargs = tiny_config_kwargs(None, 8, mod_target_layers="shiftedcos_decay_0.85_0.15", mod_router_factor=0.5,
                                mod_weight_norm="tanh_0.2_1")
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        PmodLlavaConfig(**kwargs)


def test_saved_config_for_another_layer_count_fails_to_load(tower, tmp_path):
    build_pmod(tower).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 6
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="mod_target_layer_indices"):
        load_pretrained_model(str(tmp_path))


def test_routed_layer_needs_no_host_synchronisation():
    """On the meta device any data-dependent host read (.item(), nonzero, boolean indexing) raises."""
    from pmod.layer import LayerRouting
    from pmod.routing import TokenCounts, build_layer_plans

    model = build_pmod(None, num_layers=6)
    llm = model.model
    index = llm.schedule.mod_layers[0]
    layer = llm.layers[index].to("meta")
    counts = TokenCounts(n_target=(9, 4), n_valid=(14, 11))
    plan = build_layer_plans(llm.schedule, counts, torch.device("meta"))[index]
    hidden = torch.empty(2, 14, 64, device="meta")
    cos = torch.empty(2, 14, 16, device="meta")
    routing = LayerRouting(plan, torch.empty(2, 14, dtype=torch.bool, device="meta"),
                           torch.empty(2, 14, dtype=torch.bool, device="meta"), None)
    output = layer(hidden, routing=routing, position_embeddings=(cos, cos))
    assert output.shape == (2, 14, 64) and output.device.type == "meta"


def test_opt_in_finite_check_names_the_layer(monkeypatch):
    model = build_pmod(None, num_layers=6)
    embeds = torch.randn(1, 10, 64)
    embeds[0, 5] = float("nan")
    targets = torch.zeros(1, 10, dtype=torch.bool)
    targets[0, 2:8] = True
    with torch.no_grad():
        model(inputs_embeds=embeds, mod_target_mask=targets, use_cache=False)  # off by default: no check
        monkeypatch.setenv("PMOD_CHECK_FINITE", "1")
        with pytest.raises(FloatingPointError, match=f"p-MoD layer {model.model.schedule.mod_layers[0]} "):
            model(inputs_embeds=embeds, mod_target_mask=targets, use_cache=False)


def test_bfloat16_training_step_routes_and_reaches_the_routers(tower):
    model = build_pmod(tower).to(torch.bfloat16).train()
    ids, mask = right_padded(mixed_prompts())
    labels = ids.masked_fill(~mask | (ids < 0), -100)
    loss = model(input_ids=ids, attention_mask=mask, images=images_for(mixed_prompts()).bfloat16(), labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    router = model.model.layers[model.model.schedule.mod_layers[0]].router.router.weight
    assert router.grad is not None and router.grad.dtype == torch.bfloat16 and router.grad.abs().sum() > 0
