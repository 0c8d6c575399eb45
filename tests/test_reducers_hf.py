"""Training-free reducers on transformers' own VLM classes (pmod.hf.apply_reducer), per family, tiny models.

Per family: keeping every token gives the dense logits; each layer caches text + the reducer's keep count; a
left-padded batch answers like each sample alone, and cached generation equals recomputation. On Qwen2.5-VL
(multimodal RoPE) FastV's ranking is checked against the eager attention map.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_vlm_testing import FAMILIES, Sample, greedy_without_cache, tiny_vlm, visual_token_mask, vlm_inputs

from pmod.hf import apply_pmod, apply_reducer
from pmod.hf.families import visual_token_ids
from pmod.hf_compat import output_cache
from pmod.reducers import parse_reducer
from pmod.reduction import TokenReduction

pytestmark = pytest.mark.compat
ONE_IMAGE = [Sample([1, 5, 6], [7, 8, 9, 10], image_sizes=((56, 56),))]
MIXED = [Sample([1, 5], [7, 8, 9], image_sizes=((84, 56),)),
         Sample([1, 11, 12, 13], [14], image_sizes=((56, 112),)),
         Sample([1, 20, 21, 22, 23], [24, 25])]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def test_keeping_every_token_equals_the_dense_model(family):
    dense = tiny_vlm(family)
    model = apply_reducer(copy.deepcopy(dense), "pdrop_layers1-3_lambda1")
    inputs = vlm_inputs(dense, family, MIXED)
    with torch.no_grad():
        expected, logits = dense(**inputs).logits, model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], expected[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ["fastv_k2_keep0.25", "pdrop_layers1-3_lambda0.5", "uniform_keep0.5_layer2"])
def test_each_layer_caches_text_plus_the_reducers_keep_count(family, spec):
    model = apply_reducer(tiny_vlm(family), spec)
    inputs = vlm_inputs(model, family, ONE_IMAGE)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
    n_visual = int(visual_token_mask(model, inputs["input_ids"]).sum())
    n_text = inputs["input_ids"].shape[1] - n_visual
    schedule = parse_reducer(spec).schedule(6)
    expected = [n_text + schedule.keep_count(layer, n_visual) for layer in range(6)]
    assert [cache.layers[i].get_seq_length() for i in range(6)] == expected and expected[-1] < n_text + n_visual


def pinned_greedy_without_cache(monkeypatch, model, inputs: dict, steps: int) -> list[int]:
    """Recomputation ranking from the last prompt token at every step, as the cached prefill did."""
    last_prompt_token = inputs["input_ids"].shape[1] - 1
    monkeypatch.setattr("pmod.reduction.last_valid_index", lambda valid: torch.full((1,), last_prompt_token))
    tokens = greedy_without_cache(model, inputs, steps, banned=visual_token_ids(model.config))
    monkeypatch.undo()
    return tokens


def generated(model, inputs: dict, steps: int) -> list[list[int]]:
    """Greedy tokens; a generated image placeholder would be an image token to a recomputation, so none is."""
    output = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                            suppress_tokens=list(visual_token_ids(model.config)))
    return output[:, inputs["input_ids"].shape[1]:].tolist()


def test_batches_equal_single_samples_and_cached_equals_recomputed(monkeypatch, family):
    model = apply_reducer(tiny_vlm(family), "fastv_k2_keep0.3")
    single = [generated(model, vlm_inputs(model, family, [sample]), 4)[0] for sample in MIXED]
    assert pinned_greedy_without_cache(monkeypatch, model, vlm_inputs(model, family, MIXED[:1]), 4) == single[0]
    assert generated(model, vlm_inputs(model, family, MIXED), 4) == single


def test_fastv_ranks_by_the_eager_attention_of_layer_k_minus_1_under_multimodal_rope(monkeypatch):
    dense = tiny_vlm("qwen2_5_vl")
    inputs = vlm_inputs(dense, "qwen2_5_vl", ONE_IMAGE)
    eager = copy.deepcopy(dense)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    chosen = []
    original = TokenReduction.before_layer

    def record(self, index, layer, hidden, position_embeddings):
        original(self, index, layer, hidden, position_embeddings)
        if index == 2:
            chosen.append(self.selection.kept & self.routing.target_mask)

    monkeypatch.setattr(TokenReduction, "before_layer", record)
    model = apply_reducer(dense, "fastv_k3_keep0.25")
    with torch.no_grad():
        model(**inputs)
    visual = visual_token_mask(model, inputs["input_ids"])[0].nonzero().flatten()
    scores = attentions[2][0, :, -1].mean(dim=0)[visual]
    keep = parse_reducer("fastv_k3_keep0.25").schedule(6).keep_count(3, len(visual))
    assert set(chosen[0][0].nonzero().flatten().tolist()) == set(visual[scores.topk(keep).indices].tolist())


def test_reducers_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ValueError, match="keep layer 0 dense"):
        apply_reducer(tiny_vlm("llava"), "random_keep0.5")
    with pytest.raises(NotImplementedError, match="VisionZip"):
        apply_reducer(tiny_vlm("llava"), "visionzip_dominant5_contextual3")
    pmod = apply_pmod(tiny_vlm("llava"), schedule="shiftedcos_decay_0.85_0.15", router_factor=0.5)
    with pytest.raises(TypeError, match="already has p-MoD layers"):
        apply_reducer(pmod, "fastv_k2_keep0.5")
    reduced = apply_reducer(tiny_vlm("llava"), "random_keep0.5_layer1")
    assert reduced.config.get_text_config().token_reducer == "random_keep0.5_layer1_seed0"
    with pytest.raises(NotImplementedError, match="not saved"):
        reduced.save_pretrained(tmp_path)
