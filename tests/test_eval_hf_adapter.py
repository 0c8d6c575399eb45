"""The pmod_hf lmms-eval adapter in process, on tiny transformers VLM checkpoints (dense and p-MoD, saved to disk
with their processors as hub checkpoints are): answers independent of the batch, equal to the model's own
generate on the processor's input; efficiency records from the generation's cache; loglikelihood; bad arguments."""

import json

import pytest
import torch
from hf_vlm_testing import save_tiny_checkpoint, tiny_vlm, with_random_routers
from PIL import Image

pytest.importorskip("lmms_eval")

from lmms_requests import GREEDY, generate, mixed_requests, request, two_tasks, visual  # noqa: E402

from llava.eval.lmms_hf_adapter import PmodHF  # noqa: E402
from pmod.accounting import ModelShape, estimate  # noqa: E402
from pmod.hf import apply_pmod  # noqa: E402
from pmod.reducers import parse_reducer  # noqa: E402
from pmod.schedule import schedule_from_config  # noqa: E402

pytestmark = pytest.mark.compat
FAMILIES = ("llava", "llava_onevision", "qwen2_5_vl")


def _images(count, offset):
    return [Image.new("RGB", (28 + 14 * i, 56 + 14 * (i % 2)), ((60 * i + offset) % 256, 90 + offset, 200 - 30 * i))
            for i in range(count)]


TASK_DICT = two_tasks(_images(4, 0), _images(4, 120))


def _generate(lm, requests, batch_size):
    return generate(lm, requests, batch_size, TASK_DICT)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-eval")
    folders = {}
    for family in FAMILIES:
        folders[(family, "dense")] = save_tiny_checkpoint(family, root / f"{family}-dense")
        pmod = with_random_routers(apply_pmod(tiny_vlm(family), zero_init=False))
        folders[(family, "pmod")] = save_tiny_checkpoint(family, root / f"{family}-pmod", model=pmod)
    return folders


@pytest.fixture(scope="module")
def adapters(checkpoints):
    return {key: PmodHF(pretrained=path, device="cpu") for key, path in checkpoints.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_size_three_gives_the_answers_of_batch_size_one(adapters, family):
    lm = adapters[(family, "pmod")]
    assert type(lm.model).__name__.startswith("Pmod")
    requests = mixed_requests()
    single = _generate(lm, requests, 1)
    assert _generate(lm, requests, 3) == single
    assert single[0::2] != single[1::2], "each request must answer about its own task's image"


@pytest.mark.parametrize("variant", ["dense", "pmod"])
def test_an_answer_is_the_models_own_generate_on_the_processors_input(adapters, variant):
    lm = adapters[("qwen2_5_vl", variant)]
    lm.batch_size_per_gpu = 1
    lm.task_dict = TASK_DICT
    answer = lm.generate_until([request("generate_until", ("What color?", dict(GREEDY), visual, 2, "ci_b",
                                                            "val"))])[0].text
    processor = lm._processor
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": "What color?"}]}],
                                           add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[TASK_DICT["ci_b"]["val"][2]["image"]], return_tensors="pt")
    with torch.no_grad():
        tokens = lm.model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert answer == processor.tokenizer.decode(tokens, skip_special_tokens=True).split("\n\n")[0]
    assert answer


@pytest.mark.parametrize("family", FAMILIES)
def test_efficiency_records_read_the_kept_tokens_from_the_cache(checkpoints, family, tmp_path):
    records = {}
    for variant in ("dense", "pmod"):
        lm = PmodHF(pretrained=checkpoints[(family, variant)], device="cpu", batch_size="2", log_efficiency="True",
                    efficiency_dir=str(tmp_path / variant))
        _generate(lm, mixed_requests()[:4], 2)
        records[variant] = [json.loads(line) for line in (tmp_path / variant / "efficiency_rank0.jsonl")
                            .read_text().splitlines()]
    text_config = tiny_vlm(family).config.get_text_config()
    pmod_config = apply_pmod(tiny_vlm(family)).config.get_text_config()
    schedule = schedule_from_config(pmod_config)
    assert len(records["pmod"]) == len(records["dense"]) == 4
    for dense, pmod in zip(records["dense"], records["pmod"]):
        assert (dense["doc_id"], dense["vision_tokens"]) == (pmod["doc_id"], pmod["vision_tokens"])
        assert pmod["vision_tokens"] > 0
        assert dense["kept_vision_per_layer"] == [dense["vision_tokens"]] * text_config.num_hidden_layers
        assert pmod["kept_vision_per_layer"] == schedule.keep_counts(pmod["vision_tokens"])
        expected = estimate(ModelShape.from_config(text_config), schedule, pmod["text_tokens"],
                            pmod["vision_tokens"], kv_dtype="float32")
        assert pmod["tflops"] == pytest.approx(expected.total_flops / 1e12)
        assert pmod["tflops"] < dense["tflops"] == pytest.approx(pmod["dense_tflops"])


def test_loglikelihood_is_the_log_probability_of_a_direct_forward(adapters):
    lm = adapters[("llava", "pmod")]
    lm.task_dict = TASK_DICT
    [(logprob, greedy)] = lm.loglikelihood([request("loglikelihood", ("What color?", " red", visual, 1, "ci_a",
                                                                      "test"))])
    processor = lm._processor
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": "What color?"}]}],
                                           add_generation_prompt=True, tokenize=False)
    context = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = processor.tokenizer(prompt + " red", add_special_tokens=False)["input_ids"]
    inputs = processor(text=[prompt + " red"], images=[TASK_DICT["ci_a"]["test"][1]["image"]], return_tensors="pt")
    with torch.no_grad():
        logits = lm.model(**inputs).logits[0].float()
    targets = whole[len(context):]
    logprobs = torch.log_softmax(logits[-len(targets) - 1:-1], dim=-1)
    assert logprob == pytest.approx(sum(logprobs[i, t].item() for i, t in enumerate(targets)), abs=1e-4)
    assert greedy == all(logprobs[i].argmax().item() == t for i, t in enumerate(targets))


def test_text_only_requests_and_a_built_model_work(adapters):
    lm = adapters[("qwen2_5_vl", "pmod")]
    text_only = request("generate_until", ("Name a color.", dict(GREEDY), None, 0, "ci_a", "test"))
    lm.task_dict = TASK_DICT
    answer = lm.generate_until([text_only])[0].text
    built = PmodHF(model=lm.model, processor=lm._processor)
    built.task_dict = TASK_DICT
    assert built.generate_until([text_only])[0].text == answer
    assert _generate(built, mixed_requests()[:2], 2) == _generate(lm, mixed_requests()[:2], 2)


def test_bad_model_arguments_are_named(checkpoints):
    with pytest.raises(TypeError, match="pmod_hf: unknown model argument.*conv_templat"):
        PmodHF(pretrained=checkpoints[("llava", "dense")], conv_templat="x")
    with pytest.raises(ValueError, match="pmod_hf: dtype='int8'"):
        PmodHF(pretrained=checkpoints[("llava", "dense")], dtype="int8")
    with pytest.raises(ValueError, match="pmod_hf: a built `model` needs its `processor`"):
        PmodHF(model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="pmod_hf: min_pixels / max_pixels apply to Qwen-VL"):
        PmodHF(pretrained=checkpoints[("llava", "dense")], device="cpu", max_pixels=3136)
    with pytest.raises(ValueError, match="pmod_hf: batch_size must be an integer"):
        PmodHF(pretrained=checkpoints[("llava", "dense")], batch_size="auto")


def test_max_pixels_bounds_the_qwenvisual_tokens(checkpoints, tmp_path):
    counts = {}
    for limit in (None, 4 * 28 * 28):
        lm = PmodHF(pretrained=checkpoints[("qwen2_5_vl", "pmod")], device="cpu", max_pixels=limit,
                    log_efficiency=True, efficiency_dir=str(tmp_path / str(limit)))
        lm.task_dict = {"big": {"test": [{"image": Image.new("RGB", (112, 112), (9, 99, 199))}]}}
        lm.generate_until([request("generate_until", ("What color?", dict(GREEDY), visual, 0, "big", "test"))])
        counts[limit] = lm.efficiency.records[0]["vision_tokens"]
    assert counts == {None: 16, 4 * 28 * 28: 4}


def test_a_reducer_on_a_dense_checkpoint_answers_and_is_costed_as_the_reducer(checkpoints, adapters, tmp_path):
    spec = "pdrop_layers1-3_lambda0.5"
    lm = PmodHF(pretrained=checkpoints[("qwen2_5_vl", "dense")], device="cpu", batch_size="2", reducer=spec,
                log_efficiency="True", efficiency_dir=str(tmp_path))
    assert lm.model.pmod_reducer.name == spec
    requests = mixed_requests()[:4]
    assert _generate(lm, requests, 2) == _generate(lm, requests, 1)
    records = [json.loads(line) for line in (tmp_path / "efficiency_rank0.jsonl").read_text().splitlines()]
    reducer = parse_reducer(spec)
    shape = ModelShape.from_config(tiny_vlm("qwen2_5_vl").config.get_text_config())
    for record in records[:4]:
        assert record["kept_vision_per_layer"] == reducer.schedule(6).keep_counts(record["vision_tokens"])
        expected = estimate(shape, None, record["text_tokens"], record["vision_tokens"], kv_dtype="float32",
                            reducer=reducer)
        assert record["tflops"] == pytest.approx(expected.total_flops / 1e12)
        assert record["tflops"] < record["dense_tflops"]
    with pytest.raises(ValueError, match="pmod_hf: `reducer` applies at load"):
        PmodHF(model=adapters[("llava", "dense")].model, processor=adapters[("llava", "dense")]._processor,
               reducer=spec)
