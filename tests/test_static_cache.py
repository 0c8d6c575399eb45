"""The fixed-capacity p-MoD cache (``cache_implementation="static"``): its layers write in place and keep their
addresses; compact layers keep p-MoD's KV saving; generation gives the dynamic cache's tokens (greedy, seeded
sampling, beams); and a compiled decode is one graph with no host-int inputs for every step (what CUDA graphs
need), still with the same tokens."""

from __future__ import annotations

import pytest
import torch
from hf_vlm_testing import tiny_vlm
from pmod_testing import NEXT_PROMPTS, NEXT_SIZES, build_pmod, dense_twin, next_pmod, sample_images
from transformers import CompileConfig, GenerationConfig

from llava.mm_utils import load_image_processor
from pmod.cache import PmodCache
from pmod.hf import apply_pmod
from pmod.hf_compat import output_cache
from pmod.routing import TokenCounts
from pmod.static_cache import PmodStaticCache, StaticBufferLayer, StaticCompactLayer

pytestmark = pytest.mark.compat

NEW_TOKENS = 10
DECODING = {"greedy": dict(do_sample=False), "sampling": dict(do_sample=True, top_k=20, temperature=1.5),
            "beams": dict(do_sample=False, num_beams=3)}


def states(batch, length, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, length, 4, generator=generator),
            torch.randn(batch, 2, length, 4, generator=generator))


def test_a_static_layer_attends_its_prefill_then_writes_decode_steps_in_place():
    layer = StaticBufferLayer(capacity=8)
    prompt = states(2, 5, 0)
    keys, values = layer.update(*prompt)
    assert keys.shape[-2] == 5 and layer.get_mask_sizes(1) == (8, 0)
    address = layer.keys.data_ptr()
    for step in range(3):
        token = states(2, 1, step + 1)
        keys, values = layer.update(*token)
        assert keys.shape[-2] == 8 and keys.data_ptr() == address
        torch.testing.assert_close(keys[..., 5 + step:6 + step, :], token[0], atol=0, rtol=0)
    assert int(layer.get_seq_length()) == 8
    torch.testing.assert_close(layer.keys[..., :5, :], prompt[0], atol=0, rtol=0)
    before = layer.keys.clone()
    layer.reorder_cache(torch.tensor([1, 1]))
    assert layer.keys.data_ptr() == address
    torch.testing.assert_close(layer.keys, before[[1, 1]], atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match="sized at prefill"):
        layer.batch_repeat_interleave(2)
    layer.reset()
    assert not layer.is_initialized and layer.get_seq_length() == 0


def test_a_prompt_longer_than_the_capacity_is_refused():
    with pytest.raises(ValueError, match="holds 4 tokens"):
        StaticBufferLayer(capacity=4).update(*states(1, 5, 0))


def test_a_compact_layer_holds_its_prefill_slots_plus_the_headroom_only():
    layer = StaticCompactLayer(capacity=40)
    layer.reserve(6)
    layer.update(*states(2, 9, 0))
    assert layer.capacity == 15 and layer.keys.shape[-2] == 15
    layer.reset()
    layer.reserve(None)  # a prefill that is not routed holds every token
    layer.update(*states(2, 9, 0))
    assert layer.capacity == 40


def left_padded_batch(model, vision_tower, count=4):
    images = sample_images(load_image_processor(vision_tower), model.config)[:count]
    width = max(map(len, NEXT_PROMPTS[:count]))
    ids = torch.zeros(count, width, dtype=torch.long)
    mask = torch.zeros(count, width, dtype=torch.bool)
    for row, prompt in enumerate(NEXT_PROMPTS[:count]):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = True
    return dict(inputs=ids, attention_mask=mask, images=images, image_sizes=NEXT_SIZES[:count])


def generate(model, inputs, decoding, **options):
    torch.manual_seed(3)
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          return_dict_in_generate=True, **DECODING[decoding], **options)


@pytest.fixture(scope="module")
def pmod_model(tiny_models):
    return next_pmod(tiny_models.vision_tower)


@pytest.mark.parametrize("decoding", sorted(DECODING))
def test_static_generation_gives_the_dynamic_caches_tokens(pmod_model, tiny_models, decoding):
    inputs = left_padded_batch(pmod_model, tiny_models.vision_tower)
    dynamic = generate(pmod_model, inputs, decoding)
    static = generate(pmod_model, inputs, decoding, cache_implementation="static")
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    cache = output_cache(static)
    assert isinstance(cache, PmodStaticCache)
    assert cache.get_seq_length() == output_cache(dynamic).get_seq_length()
    prompt = inputs_width(pmod_model, inputs)
    for index in pmod_model.config.mod_target_layer_indices:
        layer = cache.layers[index]
        assert layer.is_compact and layer.capacity == layer.prefill_slots + NEW_TOKENS
        assert layer.capacity < prompt + NEW_TOKENS == cache.get_max_length()


def inputs_width(model, inputs) -> int:
    """Tokens in the prompt after image expansion (what the cache holds at prefill)."""
    prepared = model.prepare_multimodal_inputs(inputs["inputs"], inputs["attention_mask"], None, inputs["images"],
                                               inputs["image_sizes"], padding_side="left")
    return prepared.inputs_embeds.shape[1]


class GraphRecorder:
    """A torch.compile backend that keeps every graph it is given and runs it uncompiled (fast on CPU)."""

    def __init__(self):
        self.graphs = []

    def __deepcopy__(self, memo):
        return self  # transformers deep-copies the compile settings; the graphs must reach this recorder

    def __call__(self, graph_module, example_inputs):
        self.graphs.append(graph_module)
        return graph_module.forward

    def host_inputs(self) -> list[list[str]]:
        """Per graph, its inputs that are host values (ints, SymInts) rather than tensors."""
        return [[node.name for node in graph.graph.nodes if node.op == "placeholder"
                 and not isinstance(node.meta.get("example_value"), torch.Tensor)] for graph in self.graphs]


@pytest.mark.parametrize("decoding", ["greedy", "sampling"])
def test_a_compiled_decode_is_one_graph_without_host_inputs_and_gives_the_same_tokens(pmod_model, tiny_models,
                                                                                      decoding):
    inputs = left_padded_batch(pmod_model, tiny_models.vision_tower)
    recorder = GraphRecorder()
    config = CompileConfig(backend=recorder, mode=None, fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    dynamic = generate(pmod_model, inputs, decoding)
    compiled = generate(pmod_model, inputs, decoding, cache_implementation="static", compile_config=config)
    assert compiled.sequences.tolist() == dynamic.sequences.tolist()
    assert len(recorder.graphs) == 1, "every decode step must reuse one graph"
    assert recorder.host_inputs() == [[]], "a host int input would make CUDA graphs record every step"
    assert output_cache(compiled).get_seq_length() == output_cache(dynamic).get_seq_length()


@pytest.mark.parametrize("decoding", ["greedy", "sampling"])
def test_the_dense_model_generates_left_padded_batches_alike_with_transformers_static_cache(
        pmod_model, tiny_models, decoding):
    dense = dense_twin(pmod_model)
    inputs = left_padded_batch(dense, tiny_models.vision_tower)
    dynamic = generate(dense, inputs, decoding)
    static = generate(dense, inputs, decoding, cache_implementation="static")
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    assert type(output_cache(static)).__name__ == "StaticCache"


def test_static_generation_needs_max_new_tokens_and_knows_its_implementations(pmod_model, tiny_models):
    inputs = left_padded_batch(pmod_model, tiny_models.vision_tower, count=1)
    with pytest.raises(ValueError, match="needs max_new_tokens"):
        pmod_model.generate(**inputs, cache_implementation="static", max_length=60)
    with pytest.raises(ValueError, match="'offloaded'"):
        pmod_model.generate(**inputs, cache_implementation="offloaded", max_new_tokens=2)


def test_a_step_past_the_capacity_is_refused_with_the_setting_to_change(pmod_model, tiny_models):
    inputs = left_padded_batch(pmod_model, tiny_models.vision_tower, count=1)
    prompt = inputs_width(pmod_model, inputs)
    cache = PmodStaticCache(pmod_model.config, max_cache_len=prompt + 2)
    with pytest.raises(ValueError, match="max_cache_len"):
        pmod_model.generate(**inputs, past_key_values=cache, max_new_tokens=5, min_new_tokens=5)


def test_pmod_hf_models_refuse_the_static_cache():
    model = apply_pmod(tiny_vlm("qwen2_5_vl"))
    with pytest.raises(NotImplementedError, match="dynamic PmodCache"):
        model.generate(input_ids=torch.ones(1, 3, dtype=torch.long), cache_implementation="static")


def test_the_dynamic_cache_stays_the_default(pmod_model, tiny_models):
    inputs = left_padded_batch(pmod_model, tiny_models.vision_tower, count=2)
    output = generate(pmod_model, inputs, "greedy")
    assert type(output_cache(output)) is PmodCache


@pytest.mark.gpu
def test_cuda_graph_decode_gives_the_dynamic_caches_tokens(tiny_models):
    """transformers' own choice on a GPU: the static cache alone turns on compilation with CUDA graphs."""
    model = next_pmod(tiny_models.vision_tower).cuda()
    inputs = left_padded_batch(model, tiny_models.vision_tower)
    inputs = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    inputs["images"] = [image.cuda() for image in inputs["images"]]
    torch._dynamo.reset()
    dynamic = generate(model, inputs, "greedy")
    compiled = generate(model, inputs, "greedy", cache_implementation="static")
    assert compiled.sequences.tolist() == dynamic.sequences.tolist()
    assert hasattr(model, "_compiled_call"), "generate did not compile the decode step"


def decode_by_hand(model, cache, steps=3):
    """A routed prefill of an uneven batch, then single-token steps without an attention mask; the logits."""
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 12, 64, generator=generator)
    targets = torch.zeros(2, 12, dtype=torch.bool)
    targets[0, 2:10], targets[1, 2:5] = True, True
    counts = TokenCounts(n_target=(8, 3), n_valid=(12, 12))
    logits = []
    with torch.no_grad():
        model(inputs_embeds=embeds, mod_target_mask=targets, token_counts=counts, past_key_values=cache,
              use_cache=True)
        for step in range(steps):
            out = model(input_ids=torch.tensor([[40 + step], [50 + step]]), past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


def test_steps_without_an_attention_mask_never_read_the_empty_slots():
    """A single-token step without padding may skip its mask (a causal kernel alone); over a static cache's
    empty slots that would be wrong: dense and compact layers alike must mask them."""
    model = build_pmod(None)
    dynamic = decode_by_hand(model, PmodCache(config=model.config))
    static = decode_by_hand(model, PmodStaticCache(model.config, max_cache_len=20))
    torch.testing.assert_close(static, dynamic, atol=1e-5, rtol=1e-5)


def test_static_decode_reads_no_device_value_on_the_host():
    """On the meta device any data-dependent host read (.item(), .all() in an if, nonzero) raises."""
    model = build_pmod(None).to("meta")
    cache = PmodStaticCache(model.config, max_cache_len=16)
    counts = TokenCounts(n_target=(8, 3), n_valid=(12, 12))
    with torch.no_grad():
        model(inputs_embeds=torch.empty(2, 12, 64, device="meta"), mod_target_mask=torch.empty(
            2, 12, dtype=torch.bool, device="meta"), token_counts=counts, past_key_values=cache, use_cache=True)
        for _ in range(2):
            out = model(input_ids=torch.zeros(2, 1, dtype=torch.long, device="meta"), past_key_values=cache,
                        use_cache=True)
    assert out.logits.shape == (2, 1, 300) and out.logits.is_meta and cache.get_seq_length() == 14


def test_a_generation_config_may_ask_for_the_static_cache(pmod_model, tiny_models):
    inputs = left_padded_batch(pmod_model, tiny_models.vision_tower, count=2)
    dynamic = generate(pmod_model, inputs, "greedy")
    settings = GenerationConfig(cache_implementation="static", max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                do_sample=False, return_dict_in_generate=True)
    static = pmod_model.generate(**inputs, generation_config=settings)
    assert static.sequences.tolist() == dynamic.sequences.tolist()
    assert isinstance(output_cache(static), PmodStaticCache) and settings.cache_implementation == "static"
