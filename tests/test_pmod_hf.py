"""p-MoD on transformers' own VLM classes (pmod.hf), per family, on tiny random models built from configs.

Per family: zero routers at keep ratio 1 give the unmodified model's logits; each layer's KV length follows the
schedule; a left-padded batch of different images answers like each sample alone; cached generation equals
recomputation; training steps lower the loss and move the routers; save -> load gives the same logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_vlm_testing import (
    FAMILIES,
    Sample,
    greedy_without_cache,
    tiny_vlm,
    visual_token_mask,
    vlm_inputs,
    with_random_routers,
)
from safetensors.torch import load_file

from pmod.hf import SUPPORTED_ARCHITECTURES, apply_pmod, from_pretrained, pmod_settings
from pmod.hf_compat import output_cache

pytestmark = pytest.mark.compat
SCHEDULE, FACTOR = "shiftedcos_decay_0.85_0.15", 0.5
ONE_IMAGE = [Sample([1, 5, 6], [7, 8, 9, 10], image_sizes=((56, 56),))]
MIXED = [Sample([1, 5], [7, 8, 9], image_sizes=((84, 56),)),
         Sample([1, 11, 12, 13], [14], image_sizes=((56, 112),)),
         Sample([1, 20, 21, 22, 23], [24, 25])]


def pmod_model(family: str, zero_init: bool = False, **kwargs):
    return apply_pmod(tiny_vlm(family), schedule=SCHEDULE, router_factor=FACTOR, zero_init=zero_init, **kwargs)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def test_zero_routers_keeping_every_token_are_the_unmodified_model(family):
    dense = tiny_vlm(family)
    model = apply_pmod(copy.deepcopy(dense), schedule="deep_all_include_last", router_factor=1.0)
    inputs = vlm_inputs(dense, family, MIXED)
    with torch.no_grad():
        expected = dense(**inputs).logits
        routed = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(routed[valid], expected[valid], atol=1e-5, rtol=0)


def test_each_layer_caches_what_the_schedule_keeps(family):
    model = with_random_routers(pmod_model(family))
    inputs = vlm_inputs(model, family, ONE_IMAGE)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    n_visual = int(visual_token_mask(model, inputs["input_ids"]).sum())
    n_text = inputs["input_ids"].shape[1] - n_visual
    schedule = model.pmod_schedule
    assert n_visual > 0 and list(schedule.mod_layers) == model.config.get_text_config().mod_target_layer_indices
    expected = [n_text + schedule.keep_count(layer, n_visual) for layer in range(schedule.num_layers)]
    assert [cache.layers[i].get_seq_length() for i in range(schedule.num_layers)] == expected
    assert expected[-1] < n_text + n_visual


def test_uneven_batch_runs_packed_layers_like_the_padded_layout(family, monkeypatch):
    """Uneven rows run their kept tokens packed, with or without a cache: the logits and the greedy tokens are the
    padded layout's."""
    import pmod.session

    model = with_random_routers(pmod_model(family))
    inputs = vlm_inputs(model, family, MIXED)
    language_model = model.model.language_model
    calls = []
    hook = language_model.layers[model.pmod_schedule.mod_layers[0]].mlp.register_forward_pre_hook(
        lambda module, args: calls.append(tuple(args[0].shape[:2])))

    def run():
        with torch.no_grad():
            return (model(**inputs, use_cache=False).logits, model(**inputs, use_cache=True).logits,
                    generated(model, inputs, 4))

    packed, packed_cached, packed_tokens = run()
    monkeypatch.setattr(pmod.session, "packs_kept_tokens", lambda *args: False)
    first_padded_call = len(calls)
    padded, padded_cached, padded_tokens = run()
    hook.remove()
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(packed[valid], padded[valid], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(packed_cached[valid], padded_cached[valid], atol=2e-5, rtol=1e-4)
    assert torch.equal(packed_tokens, padded_tokens)
    assert calls[0][0] == 1 and calls[1][0] == 1  # packed, without and with a cache
    padded_batch, padded_length = calls[first_padded_call]
    assert padded_batch == len(MIXED) and calls[0][1] < padded_batch * padded_length


def generated(model, inputs: dict, steps: int) -> torch.Tensor:
    output = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return output[:, inputs["input_ids"].shape[1]:]


def test_cached_generation_equals_recomputation_and_batches_equal_single_samples(family):
    model = with_random_routers(pmod_model(family))
    single = [generated(model, vlm_inputs(model, family, [sample]), 4)[0].tolist() for sample in MIXED]
    for sample, tokens in zip(MIXED[:1], single):
        assert greedy_without_cache(model, vlm_inputs(model, family, [sample]), 4) == tokens
    batched = generated(model, vlm_inputs(model, family, MIXED), 4).tolist()
    assert batched == single


def test_training_steps_lower_the_loss_and_move_the_routers(family):
    model = with_random_routers(pmod_model(family)).train()
    inputs = vlm_inputs(model, family, MIXED)
    labels = inputs["input_ids"].masked_fill(~inputs["attention_mask"].bool(), -100)
    labels = labels.masked_fill(visual_token_mask(model, inputs["input_ids"]), -100)
    routers = {name: param.detach().clone() for name, param in model.named_parameters() if ".router." in name}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(**inputs, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = [name for name, param in model.named_parameters() if ".router." in name
             and not torch.equal(param.detach(), routers[name])]
    assert routers and len(moved) == len(routers)


def test_save_and_load_give_the_same_model(family, tmp_path):
    model = with_random_routers(pmod_model(family))
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == type(model).__name__ and pmod_settings(loaded) == pmod_settings(model)
    inputs = vlm_inputs(model, family, MIXED)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


def test_checkpoints_keep_the_hub_weight_names_plus_routers(family, tmp_path):
    tiny_vlm(family).save_pretrained(tmp_path / "dense")
    pmod_model(family).save_pretrained(tmp_path / "pmod")
    dense, pmod = (set(load_file(tmp_path / name / "model.safetensors")) for name in ("dense", "pmod"))
    routers = {name for name in pmod if ".router." in name}
    assert pmod - routers == dense and len(routers) == 2 * 4  # weight and bias on each of layers 2-5


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_qwen2_5_vl_routes_video_tokens_too(family):
    model = with_random_routers(pmod_model(family))
    sample = Sample([1, 5], [7, 8], video_frames=4)
    inputs = vlm_inputs(model, family, [sample])
    n_visual = int(visual_token_mask(model, inputs["input_ids"]).sum())
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    n_text = inputs["input_ids"].shape[1] - n_visual
    last = model.pmod_schedule.num_layers - 1
    assert n_visual > 0 and cache.layers[last].get_seq_length() == n_text + model.pmod_schedule.keep_count(last,
                                                                                                         n_visual)
    tokens = generated(model, inputs, 3)[0].tolist()
    assert tokens == greedy_without_cache(model, inputs, 3)


def test_unsupported_models_and_schedules_are_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2))
    with pytest.raises(ValueError, match="does not support LlamaForCausalLM; supported: " + SUPPORTED_ARCHITECTURES[0]):
        apply_pmod(text_only)
    with pytest.raises(ValueError, match="keeps layer 0 dense"):
        apply_pmod(tiny_vlm("llava"), schedule=SCHEDULE, router_factor=0.3)
    with pytest.raises(ValueError, match="no p-MoD settings"):
        dense = tiny_vlm("llava")
        dense.save_pretrained(tmp_path)
        from_pretrained(tmp_path)
