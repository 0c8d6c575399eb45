"""Training-free reducers on tiny dense LLaVA models: specs, equality with dense at full budget, KV lengths,
batching, cached generation, the papers' ranking rules against eager attention, and their accounting."""

from __future__ import annotations

import copy

import pytest
import torch
from pmod_testing import (
    build_pmod,
    dense_twin,
    images_for,
    mixed_prompts,
    real_prefill_slots,
    right_padded,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from llava.model import LlavaLlamaForCausalLM
from llava.model.builder import load_pretrained_model
from llava.model.reduce import apply_reducer, remove_reducer
from pmod.accounting import ModelShape, attention_flops, estimate, main
from pmod.hf_compat import output_cache
from pmod.reducers import (
    fastv_for_budget,
    for_budget,
    host_scores,
    mean_vision_tokens,
    parse_reducer,
    pdrop_for_budget,
    pre_llm_for_budget,
)
from pmod.reduction import TokenReduction

pytestmark = pytest.mark.compat
REDUCED = ["fastv_k2_keep0.25", "pdrop_layers2-4-6_lambda0.5", "random_keep0.3_seed3", "uniform_keep0.5_layer1",
           "visionzip_dominant5_contextual3"]
KEEP_ALL = ["fastv_k2_keep1", "pdrop_layers2-4-6_lambda1", "random_keep1", "uniform_keep1"]


@pytest.fixture(scope="module")
def dense_weights(tiny_models):
    return build_pmod(tiny_models.vision_tower)


def reduced(dense_weights, spec, **overrides):
    model = dense_twin(dense_weights)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    return apply_reducer(model, spec)


def test_spec_strings_round_trip_and_schedules():
    fastv = parse_reducer("fastv_k2_r0.75")
    assert fastv == parse_reducer("fastv_k2_keep0.25") and fastv.name == "fastv_k2_keep0.25"
    assert fastv.schedule(8).ratios == (None, None) + (0.25,) * 6
    pdrop = parse_reducer("pdrop_layers8-16-24_lambda0.5")
    assert pdrop.stage_ratios == (0.5, 0.25, 0.125) and parse_reducer(pdrop.name) == pdrop
    assert [pdrop.schedule(32).keep_count(layer, 576) for layer in (7, 8, 16, 24, 31)] == [576, 288, 144, 72, 72]
    assert mean_vision_tokens(pdrop, 576, 32) == 270  # PyramidDrop's 576 -> 288 -> 144 -> 72
    assert mean_vision_tokens(fastv, 576, 32) == 171  # FastV K=2 keep 144 (SparseVLM issue #12)
    assert parse_reducer("random_keep0.3_seed3").name == "random_keep0.3_layer0_seed3"
    assert parse_reducer("uniform_keep0.5_layer1").schedule(4).ratios == (None, 0.5, 0.5, 0.5)


@pytest.mark.parametrize("spec, message", [
    ("zip_keep0.5", "unknown method 'zip'"),
    ("fastv_k0_keep0.5", "K >= 1"),
    ("fastv_k2", "exactly one of keep and r"),
    ("fastv_k2_keep0.5_r0.5", "exactly one of keep and r"),
    ("fastv_k2_keep=0.5", "cannot read 'keep=0.5'"),
    ("pdrop_layers8-4_lambda0.5", "must increase"),
    ("pdrop_layers8-16", "missing option 'lambda'"),
    ("random_keep1.5", r"\(0, 1\]"),
    ("fastv_k2_r1", r"\(0, 1\]"),
    ("uniform_keep0.5_seed2", "unknown option"),
    ("visionzip_dominant0_contextual2", "dominant >= 1"),
    ("visionzip_dominant54", "missing option 'contextual'"),
])
def test_bad_specs_name_the_spec_and_the_fix(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_reducer(spec)
    assert spec in str(error.value)


def test_budget_matching_hits_the_fields_conventions():
    for target in (192, 128, 64):
        assert mean_vision_tokens(fastv_for_budget(2, 576, 32, target), 576, 32) == pytest.approx(target, abs=0.6)
        assert mean_vision_tokens(pdrop_for_budget((2, 8, 16), 576, 32, target), 576, 32) == pytest.approx(
            target, abs=1.5)
        assert mean_vision_tokens(pre_llm_for_budget("random", 576, target), 576, 32) == target
    assert fastv_for_budget(2, 576, 32, 192).stage_ratios[0] == pytest.approx(166 / 576, abs=1e-3)
    with pytest.raises(ValueError, match="cannot average"):
        fastv_for_budget(8, 576, 32, 64)


@pytest.mark.parametrize("spec", KEEP_ALL)
def test_keeping_every_token_equals_the_dense_model(dense_weights, spec):
    prompts = mixed_prompts()
    ids, mask = right_padded(prompts)
    images = images_for(prompts)
    dense = dense_twin(dense_weights)
    model = reduced(dense_weights, spec)
    with torch.no_grad():
        expected = dense(input_ids=ids, attention_mask=mask, images=images).logits
        logits = model(input_ids=ids, attention_mask=mask, images=images).logits
        valid = model.prepare_multimodal_inputs(ids, mask, None, images).attention_mask
    assert model.model.last_routing_stats.n_vision == (0, 16, 32)
    torch.testing.assert_close(logits[valid], expected[valid], atol=1e-5, rtol=0)


def greedy_without_cache(monkeypatch, model, prompt, images, steps):
    """Greedy decoding that recomputes the whole sequence at every step. FastV and PyramidDrop rank from the
    last prompt token once, at prefill; the recomputation is pinned to that same query row."""
    prompt_ids = torch.tensor([prompt])
    last_prompt_token = model.prepare_multimodal_inputs(prompt_ids, None, None, images).inputs_embeds.shape[1] - 1
    monkeypatch.setattr("pmod.reduction.last_valid_index", lambda valid: torch.full((1,), last_prompt_token))
    tokens = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + tokens]), images=images, use_cache=False).logits
        tokens.append(int(logits[0, -1].argmax()))
    monkeypatch.undo()
    return tokens


@pytest.mark.parametrize("spec", REDUCED)
def test_kv_lengths_batching_and_cached_generation(monkeypatch, dense_weights, spec):
    """Each compact layer caches text + the reducer's keep count; batch == alone == recomputed without cache."""
    model = reduced(dense_weights, spec)
    prompts = mixed_prompts()
    images = images_for(prompts)
    per_sample_images = [images[0:1], images[1:2], images[2:4]]
    ids, mask = right_padded(prompts)
    result = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=5, min_new_tokens=5,
                            do_sample=False, return_dict_in_generate=True)
    for row, (prompt, image) in enumerate(zip(prompts, per_sample_images)):
        alone = model.generate(torch.tensor([prompt]), images=image, max_new_tokens=5, min_new_tokens=5,
                               do_sample=False)
        recomputed = greedy_without_cache(monkeypatch, model, prompt, image, 5)
        assert result.sequences[row].tolist() == alone[0].tolist() == recomputed

    cache = output_cache(result)
    reducer = parse_reducer(spec)
    n_text = [len(p) - p.count(-200) for p in prompts]
    if reducer.merges_before_llm:  # every layer caches the D + C tokens per image the LLM saw
        seen = [n + reducer.tokens_per_image * p.count(-200) for n, p in zip(n_text, prompts)]
        assert model.config.mod_target_layer_indices == [] and seen[2] < n_text[2] + 32
        assert all(cache.layers[layer].get_seq_length() == max(seen) + 4 for layer in range(8))
        return
    schedule = reducer.schedule(8)
    n_vision = [0, 16, 32]
    assert list(model.config.mod_target_layer_indices) == list(schedule.mod_layers)
    for layer in range(8):
        if schedule.is_mod(layer):
            expected = [n_text[b] + schedule.keep_count(layer, n_vision[b]) for b in range(3)]
            assert real_prefill_slots(cache, layer) == expected
            assert expected[2] < n_text[2] + 32
        else:
            assert cache.compact_layer(layer) is None
            assert cache.layers[layer].get_seq_length() == max(n + v for n, v in zip(n_text, n_vision)) + 4


def kept_by_stage(monkeypatch, model, ids, mask, images):
    """Run a forward and return, per scoring stage, the kept vision-token mask the reducer chose."""
    chosen = []
    original = TokenReduction.before_layer

    def record(self, index, layer, hidden, position_embeddings):
        before = self.selection
        original(self, index, layer, hidden, position_embeddings)
        if self.selection is not before:
            chosen.append(self.selection.kept & self.routing.target_mask)

    monkeypatch.setattr(TokenReduction, "before_layer", record)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=images)
    return chosen


@pytest.mark.parametrize("spec, score_layer", [("fastv_k3_keep0.25", 2), ("pdrop_layers4-6_lambda0.5", 4)])
def test_ranking_follows_the_papers_attention_rule(monkeypatch, dense_weights, spec, score_layer):
    """FastV: layer K-1's attention from the last prompt token, mean over heads; PyramidDrop: layer l's own.
    The reference is the eager attention map of the dense model."""
    prompts = mixed_prompts()
    ids, mask = right_padded(prompts)
    images = images_for(prompts)
    eager = dense_twin(dense_weights)
    eager.set_attn_implementation("eager")
    prepared = eager.prepare_multimodal_inputs(ids, mask, None, images)
    with torch.no_grad():
        attentions = eager(inputs_embeds=prepared.inputs_embeds, attention_mask=prepared.attention_mask,
                           output_attentions=True).attentions
    model = reduced(dense_weights, spec)
    chosen = kept_by_stage(monkeypatch, model, ids, mask, images)
    assert len(chosen) == len(parse_reducer(spec).drop_layers)
    reducer = parse_reducer(spec)
    for row in range(3):
        last = int(prepared.attention_mask[row].nonzero().max())
        scores = attentions[score_layer][row, :, last].mean(dim=0)
        vision = prepared.target_mask[row].nonzero().flatten()
        keep = reducer.schedule(8).keep_count(reducer.drop_layers[0], len(vision))
        expected = set(vision[scores[vision].topk(keep).indices].tolist()) if keep else set()
        assert set(chosen[0][row].nonzero().flatten().tolist()) == expected
        for earlier, later in zip(chosen, chosen[1:]):
            assert not (later[row] & ~earlier[row]).any(), "a dropped token came back"


def test_random_is_seeded_and_uniform_is_evenly_spaced():
    uniform = host_scores(parse_reducer("uniform_keep0.25"), (16, 0, 6), (4, 0, 3))
    assert uniform[0].nonzero().flatten().tolist() == [3, 7, 11, 15]
    assert uniform[2, :6].nonzero().flatten().tolist() == [1, 3, 5]
    assert torch.isinf(uniform[1]).all()
    first = host_scores(parse_reducer("random_keep0.5_seed1"), (16, 16), (8, 8))
    assert torch.equal(first[0], first[1])  # the same image size keeps the same positions: batch independent
    again = host_scores(parse_reducer("random_keep0.5_seed1"), (16,), (8,))
    other = host_scores(parse_reducer("random_keep0.5_seed2"), (16,), (8,))
    assert torch.equal(first[:1], again) and not torch.equal(again, other)


def test_score_selection_needs_no_host_synchronisation(dense_weights):
    """On the meta device a data-dependent host read raises; the reducer's scoring layer must not make one."""
    from pmod.routing import TokenCounts, build_layer_plans
    from pmod.session import RoutingInputs

    model = reduced(dense_weights, "pdrop_layers2-4_lambda0.5")
    layer = model.model.layers[2].to("meta")
    counts = TokenCounts(n_target=(9, 4), n_valid=(14, 11))
    plans = build_layer_plans(model.model.schedule, counts, torch.device("meta"))
    masks = [torch.empty(2, 14, dtype=torch.bool, device="meta") for _ in range(2)]
    reduction = TokenReduction(model.model.reducer, RoutingInputs(*masks, counts), plans)
    cos = torch.empty(2, 14, 16, device="meta")
    reduction.before_layer(2, layer, torch.empty(2, 14, 64, device="meta"), (cos, cos))
    assert reduction.selection.kept.device.type == "meta"


def test_apply_reducer_needs_a_dense_llava_model_and_is_not_saved(dense_weights, tmp_path):
    with pytest.raises(TypeError, match="needs a dense LLaVA model"):
        apply_reducer(dense_weights, "fastv_k2_keep0.5")
    model = reduced(dense_weights, "fastv_k2_keep0.5")
    with pytest.raises(NotImplementedError, match="not saved"):
        model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not exist in a 8-layer LLM"):
        reduced(dense_weights, "pdrop_layers4-8_lambda0.5")


def test_load_pretrained_model_applies_the_reducer(tiny_models, dense_weights, tmp_path):
    from transformers import AutoTokenizer

    dense_twin(dense_weights).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_models.llm).save_pretrained(tmp_path)
    _, model, _, _ = load_pretrained_model(str(tmp_path), dtype=torch.float32, reducer="pdrop_layers2-4_lambda0.5")
    prompts = mixed_prompts()
    ids, mask = right_padded(prompts)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=images_for(prompts))
    assert model.model.last_routing_stats.kept_vision[4] == (0, 4, 8)
    with pytest.raises(ValueError, match="unknown method"):
        load_pretrained_model(str(tmp_path), reducer="zip_keep0.5")

    import argparse

    from llava.serve.common import add_model_arguments, load_for_inference

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--model-path", str(tmp_path), "--device", "cpu", "--reducer", "uniform_keep0.5"])
    _, served, _ = load_for_inference(args)
    assert served.model.reducer.name == "uniform_keep0.5_layer0"


@pytest.mark.parametrize("spec", ["fastv_k2_keep0.25", "pdrop_layers2-5_lambda0.5", "uniform_keep0.5"])
def test_accounting_equals_a_flop_counter(dense_weights, spec):
    """Batch 1, no padding: the reduced forward's matmul FLOPs (SDPA counted as a full square by torch) are
    the accounting's, score rows included; its T_avg is the kept tokens per layer averaged. Some transformers
    releases build RoPE's angles with a matmul, which the accounting leaves out: it is counted apart."""
    model = reduced(dense_weights, spec)
    n_text, n_vision = 7, 24
    embeds = torch.randn(1, n_text + n_vision, 64)
    targets = torch.zeros(1, n_text + n_vision, dtype=torch.bool)
    targets[0, 3:3 + n_vision] = True
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(inputs_embeds=embeds, mod_target_mask=targets, use_cache=False)
    with torch.no_grad(), FlopCounterMode(display=False) as rope:
        model.model.rotary_emb(embeds, torch.arange(n_text + n_vision)[None])
    shape = ModelShape.from_config(model.config)
    report = estimate(shape, None, n_text, n_vision, lm_head_tokens=n_text + n_vision, reducer=parse_reducer(spec))
    square = sum(attention_flops(shape, cost.tokens, causal=False) - cost.attention_flops for cost in report.layers)
    assert counter.get_total_flops() - rope.get_total_flops() == report.total_flops + square
    kept = model.model.last_routing_stats.kept_vision
    assert report.mean_vision_tokens == sum(kept.get(layer, (n_vision,))[0] for layer in range(8)) / 8
    assert report.flops_ratio < 1 and sum(cost.score_flops > 0 for cost in report.layers) == (
        len(parse_reducer(spec).drop_layers) if parse_reducer(spec).uses_attention else 0)


def test_accounting_cli_reducer(capsys):
    assert main(["--preset", "llava-1.5-7b", "--reducer", "fastv_k2_r0.75"]) == 0
    out = capsys.readouterr().out
    assert "fastv_k2_keep0.25" in out and "vision tokens, layer mean" in out and "171.0" in out
    with pytest.raises(SystemExit, match="leave out --beta"):
        main(["--preset", "llava-1.5-7b", "--reducer", "fastv_k2_r0.75", "--beta", "0.5"])
    with pytest.raises(SystemExit, match="--reducer: reducer 'fastv'"):
        main(["--preset", "llava-1.5-7b", "--reducer", "fastv"])
    assert main(["--preset", "llava-1.5-7b", "--reducer", "pdrop", "--budget", "128"]) == 0
    out = capsys.readouterr().out
    assert "pdrop_layers2-8-16_lambda0.4211" in out and out.split("layer mean")[1].split()[0] == "128.4"
    with pytest.raises(SystemExit, match="--budget needs --reducer"):
        main(["--preset", "llava-1.5-7b", "--budget", "128"])
    with pytest.raises(SystemExit, match="cannot average"):
        main(["--preset", "llava-1.5-7b", "--reducer", "pdrop_layers8-16-24", "--budget", "64"])


def test_families_are_solved_for_a_budget():
    assert for_budget("fastv", 1 / 3, 576, 32).name == "fastv_k2_keep0.289"
    assert for_budget("pdrop", 2 / 9, 576, 32).drop_layers == (2, 8, 16)
    assert for_budget("pdrop_layers8-16-24", 1 / 3, 576, 32).drop_layers == (8, 16, 24)
    assert for_budget("random_seed4", 0.25, 576, 32).name == "random_keep0.25_layer0_seed4"
    with pytest.raises(ValueError, match="cannot average"):
        for_budget("pdrop_layers8-16-24", 1 / 9, 576, 32)
    with pytest.raises(ValueError, match="reducer family 'fastv_keep0.5'"):
        for_budget("fastv_keep0.5", 0.25, 576, 32)


def test_remove_reducer_gives_the_dense_model_back(dense_weights):
    prompts = mixed_prompts()
    ids, mask = right_padded(prompts)
    images = images_for(prompts)
    dense = dense_twin(dense_weights)
    with torch.no_grad():
        expected = dense(input_ids=ids, attention_mask=mask, images=images).logits
    model = apply_reducer(apply_reducer(dense, "fastv_k2_keep0.25"), "uniform_keep0.5")
    assert model.model.reducer.method == "uniform" and model.config.token_reducer == "uniform_keep0.5_layer0"
    remove_reducer(model)
    assert type(model) is LlavaLlamaForCausalLM and not hasattr(model.config, "token_reducer")
    assert not hasattr(model.config, "mod_target_layer_indices")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask, images=images).logits, expected,
                                   atol=0, rtol=0)
    with pytest.raises(TypeError, match="remove_reducer needs"):
        remove_reducer(model)


def eager_clip_reference(tower, images, dominant, contextual):
    """VisionZip's rule written out on the eager attention map and a k_proj hook, one image at a time."""
    clip = copy.deepcopy(tower.vision_tower)
    clip.set_attn_implementation("eager")
    layers = getattr(clip, "vision_model", clip).encoder.layers
    index = tower.select_layer % (len(layers) + 1)
    captured = {}
    layers[index - 1].self_attn.k_proj.register_forward_hook(lambda module, args, out: captured.update(keys=out))
    with torch.no_grad():
        outputs = clip(images, output_hidden_states=True, output_attentions=True)
    features = outputs.hidden_states[index]
    heads = layers[index - 1].self_attn.num_heads
    keys = captured["keys"].view(*captured["keys"].shape[:2], heads, -1).mean(dim=2)
    result = []
    for image in range(images.shape[0]):
        cls_row = outputs.attentions[index - 1][image, :, 0].sum(dim=0)
        patches = sorted((cls_row[1:].topk(dominant - 1).indices + 1).tolist())
        rows = [features[image, 0]] + [features[image, p] for p in patches]
        rest = [t for t in range(1, features.shape[1]) if t not in patches]
        targets = rest[::max(1, len(rest) // contextual)][:contextual]
        groups = {t: [] for t in targets}
        for token in (t for t in rest if t not in targets):
            cosine = [torch.nn.functional.cosine_similarity(keys[image, token], keys[image, t], dim=0) for t in targets]
            groups[targets[int(torch.stack(cosine).argmax())]].append(features[image, token])
        rows += [features[image, t] + (torch.stack(g).mean(0) if g else 0) for t, g in groups.items()]
        result.append(torch.stack(rows))
    return torch.stack(result), features


def test_visionzip_follows_its_rule_on_the_eager_attention_map(dense_weights):
    from llava.model.visionzip import visionzip_features

    tower = dense_weights.get_vision_tower()
    images = images_for(mixed_prompts())[:3]
    expected, selected_layer = eager_clip_reference(tower, images, dominant=5, contextual=3)
    torch.testing.assert_close(visionzip_features(tower, images, 5, 3), expected, atol=1e-5, rtol=1e-5)
    everything = visionzip_features(tower, images, dominant=17, contextual=0)
    torch.testing.assert_close(everything, selected_layer, atol=1e-5, rtol=1e-5)  # CLS + every patch, in order
    with pytest.raises(ValueError, match="dominant 10 \\+ contextual 8 needs more than the 16 patches"):
        visionzip_features(tower, images, 10, 8)


def test_visionzip_costs_and_records_count_the_towers_tokens(dense_weights):
    from llava.eval.efficiency import EfficiencyLog

    spec = parse_reducer("visionzip_dominant54_contextual10")
    shape = ModelShape.from_config(dense_weights.config)
    report = estimate(shape, None, 40, 576, reducer=spec)
    same_llm = estimate(shape, None, 40, 64)
    assert [c.tokens for c in report.layers] == [c.tokens for c in same_llm.layers] == [104] * 8
    assert report.mean_vision_tokens == 64 and report.vision_kv_ratio == 64 / 576
    assert report.dense_layers[0].tokens == 616 and report.flops_ratio < 0.2

    model = reduced(dense_weights, "visionzip_dominant5_contextual3")
    log = EfficiencyLog(model.config, None, 0, tile_tokens=16)
    entry = log.record(task="t", split="s", doc_id=0, prompt_tokens=9, text_tokens=7, vision_tokens=16,
                       kept_vision=[16] * 8, generated_tokens=1)  # two images of D + C = 8 tokens
    assert entry["vision_tokens"] == 32 and entry["vision_kv_ratio"] == 0.5 and entry["tflops"] < entry["dense_tflops"]


def test_visionzip_refuses_anyres_checkpoints(dense_weights):
    with pytest.raises(NotImplementedError, match="AnyRes"):
        reduced(dense_weights, "visionzip_dominant5_contextual3", image_aspect_ratio="anyres")
