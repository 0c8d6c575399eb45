"""The pmod_llava lmms-eval adapter in process, on tiny random checkpoints (dense pad, p-MoD pad, p-MoD anyres)."""

import json

import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")

from lmms_requests import GREEDY, generate, mixed_requests, request, two_tasks, visual  # noqa: E402

from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.eval.lmms_adapter import PmodLlava  # noqa: E402
from llava.eval.prompting import build_prompt  # noqa: E402
from llava.eval.tiny_checkpoint import build_tiny_llava_checkpoint  # noqa: E402
from llava.mm_utils import process_images, tokenizer_image_token  # noqa: E402
from pmod.accounting import ModelShape, estimate  # noqa: E402
from pmod.schedule import schedule_from_config  # noqa: E402

pytestmark = pytest.mark.compat
VARIANTS = {"dense_pad": (False, "pad"), "pmod_pad": (True, "pad"), "pmod_anyres": (True, "anyres")}


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-ckpts")
    return {name: build_tiny_llava_checkpoint(tiny_models, str(root / name), pmod=pmod, image_aspect_ratio=aspect)
            for name, (pmod, aspect) in VARIANTS.items()}


@pytest.fixture(scope="module")
def adapters(checkpoints):
    return {name: PmodLlava(pretrained=path, device="cpu", batch_size="1") for name, path in checkpoints.items()}


def _images(count, offset):
    return [Image.new("RGB", (30 + 17 * i, 70 - 9 * (i % 3)), ((60 * i + offset) % 256, 90 + offset, 200 - 30 * i))
            for i in range(count)]


TASK_DICT = two_tasks(_images(4, 0), _images(4, 120))


def _generate(lm, requests, batch_size):
    return generate(lm, requests, batch_size, TASK_DICT)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_batch_size_three_gives_the_answers_of_batch_size_one(adapters, variant):
    lm = adapters[variant]
    requests = mixed_requests()
    single = _generate(lm, requests, 1)
    batched = _generate(lm, requests, 3)
    assert batched == single
    # Each request used its own task's document: the two tasks hold different images for a doc id.
    assert single[0::2] != single[1::2]


def test_each_answer_is_the_answer_to_its_own_request_alone(adapters):
    lm = adapters["pmod_pad"]
    requests = mixed_requests()
    batched = _generate(lm, requests, 3)
    alone = [_generate(lm, [request], 1)[0] for request in requests[3:6]]
    assert batched[3:6] == alone


def _novisual(doc):
    return []


def test_text_only_requests_answer_like_plain_generate(adapters):
    lm = adapters["pmod_pad"]
    text_requests = [request("generate_until", (f"Count to {n}.", dict(GREEDY), _novisual, n, "ci_a", "test"))
                     for n in range(3)]
    mixed = mixed_requests()[:3] + text_requests
    single = _generate(lm, mixed, 1)
    assert _generate(lm, mixed, 3) == single
    ids = torch.tensor([tokenizer_image_token(build_prompt("Count to 2.", 0, lm.conv_template), lm.tokenizer)])
    with torch.no_grad():
        full = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=lm.tokenizer.pad_token_id)
    assert single[-1] == lm.tokenizer.decode(full[0, ids.shape[1]:], skip_special_tokens=True).split("\n\n")[0]


def test_until_stop_strings_are_applied(adapters):
    lm = adapters["dense_pad"]
    free = _generate(lm, mixed_requests({"max_new_tokens": 6, "temperature": 0})[:1], 1)[0]
    assert len(free) >= 4
    stop = free[2:4]
    stopped = _generate(lm, mixed_requests({"max_new_tokens": 6, "temperature": 0, "until": [stop]})[:1], 1)[0]
    assert stopped == free[: free.find(stop)]


def _direct_logits(lm, context, continuation, image):
    prompt = build_prompt(context, 1, lm.conv_template)
    ids = torch.tensor([tokenizer_image_token(prompt + continuation, lm.tokenizer, IMAGE_TOKEN_INDEX)])
    images = process_images([image], lm._image_processor, lm.model.config)
    with torch.no_grad():
        return lm.model(input_ids=ids, images=images, image_sizes=[image.size]).logits[0]


@pytest.mark.parametrize("variant", ["dense_pad", "pmod_anyres"])
def test_loglikelihood_is_the_log_probability_of_a_direct_forward(adapters, variant):
    lm = adapters[variant]
    lm.task_dict = TASK_DICT
    image = TASK_DICT["ci_a"]["test"][1]["image"]
    context, continuation = "Is the shape red?", " yes red"
    _, continuation_ids = lm._split_continuation(context, continuation, 1)
    logits = _direct_logits(lm, context, continuation, image)
    logprobs = torch.log_softmax(logits[-len(continuation_ids) - 1:-1].float(), dim=-1)
    expected = sum(logprobs[i, token].item() for i, token in enumerate(continuation_ids))

    greedy_token = int(_direct_logits(lm, context, "", image)[-1].argmax())
    greedy_text = lm.tokenizer.decode([greedy_token])
    assert lm._split_continuation(context, greedy_text, 1)[1] == [greedy_token]

    requests = [request("loglikelihood", (context, continuation, visual, 1, "ci_a", "test")),
                request("loglikelihood", (context, greedy_text, visual, 1, "ci_a", "test"))]
    (logprob, is_greedy), (greedy_logprob, greedy_flag) = lm.loglikelihood(requests)
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert logprob < 0 and not is_greedy
    assert greedy_flag and greedy_logprob > logprob


def test_clean_keeps_the_model_usable(adapters):
    lm = adapters["pmod_pad"]
    before = _generate(lm, mixed_requests()[:2], 1)
    lm.clean()
    assert isinstance(lm.model, torch.nn.Module)
    assert _generate(lm, mixed_requests()[:2], 1) == before


def test_built_model_gives_the_same_answers_as_the_checkpoint(adapters):
    loaded = adapters["pmod_anyres"]
    built = PmodLlava(model=loaded.model, tokenizer=loaded.tokenizer, image_processor=loaded._image_processor,
                      batch_size=2)
    assert built.device == torch.device("cpu") and built.rank == 0 and built.world_size == 1
    requests = mixed_requests()
    reference = _generate(loaded, requests, 1)
    loaded.model.train()  # as during training: answered in eval mode, handed back in train mode
    try:
        assert _generate(built, requests, 2) == reference
        assert loaded.model.training
    finally:
        loaded.model.eval()


@pytest.mark.parametrize("variant", ["pmod_pad", "pmod_anyres", "dense_pad"])
def test_efficiency_records_follow_schedule_and_accounting(checkpoints, tmp_path, variant):
    lm = PmodLlava(pretrained=checkpoints[variant], device="cpu", batch_size=3, log_efficiency=True,
                   efficiency_dir=str(tmp_path))
    requests = mixed_requests()
    padding = request("generate_until", requests[-1].args)
    padding.metadata["__padding_only__"] = True  # what lmms-eval adds to even out ranks
    _generate(lm, requests + [padding], 3)
    lm.clean()
    lines = (tmp_path / "efficiency_rank0.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(requests)
    assert {(r["task"], r["doc_id"]) for r in records} == {(r.args[4], r.args[3]) for r in requests}
    config = lm.model.config
    schedule = schedule_from_config(config)
    shape = ModelShape.from_config(config)
    for record in records:
        n_vision = record["vision_tokens"]
        if VARIANTS[variant][1] == "pad":
            assert n_vision == 16  # (56 / 14) ** 2 patches of the tiny CLIP
        else:
            assert n_vision > 16  # base tile plus unpadded grid tiles
        prompt_ids = record["prompt_tokens"]
        assert record["text_tokens"] == prompt_ids - 1  # the image placeholder became vision tokens
        expected_kept = schedule.keep_counts(n_vision) if schedule else [n_vision] * shape.num_layers
        assert record["kept_vision_per_layer"] == expected_kept
        report = estimate(shape, schedule, record["text_tokens"], n_vision, kv_dtype="float32")
        assert record["tflops"] == pytest.approx(report.total_flops / 1e12)
        if schedule is None:
            assert record["tflops"] == record["dense_tflops"] and record["vision_kv_ratio"] == 1.0
        else:
            assert record["tflops"] < record["dense_tflops"] and record["vision_kv_ratio"] < 0.7
    assert lm.efficiency.summary()["samples"] == len(requests)


def test_bad_model_arguments_are_named(checkpoints):
    with pytest.raises(TypeError, match=r"unknown model argument\(s\) temperature; accepted: pretrained, "):
        PmodLlava(pretrained=checkpoints["dense_pad"], temperature="0")
    with pytest.raises(ValueError, match="use_cache=False"):
        PmodLlava(pretrained=checkpoints["dense_pad"], use_cache="False")
    with pytest.raises(ValueError, match="batch_size"):
        PmodLlava(pretrained=checkpoints["dense_pad"], batch_size="auto")
    with pytest.raises(ValueError, match="dtype"):
        PmodLlava(pretrained=checkpoints["dense_pad"], dtype="int3")
    with pytest.raises(ValueError, match="pretrained"):
        PmodLlava()


def test_multi_round_generation_is_explicitly_unsupported(adapters):
    with pytest.raises(NotImplementedError, match="multi-round"):
        adapters["dense_pad"].generate_until_multi_round([])


def test_the_builtin_llava_models_arguments_work(checkpoints, tmp_path):
    """lmms-eval's `llava` model arguments: device_map, customized_config, tie_weights, truncation, ..."""
    overrides = tmp_path / "overrides.json"
    overrides.write_text(json.dumps({"tokenizer_model_max_length": 3000}))
    lm = PmodLlava(pretrained=checkpoints["pmod_pad"], device_map="cpu", conv_template="vicuna_v1",
                   customized_config=str(overrides), tie_weights="True", use_cache="True", truncation="True",
                   truncate_context="False", attn_implementation="sdpa")
    assert lm.device.type == "cpu" and lm.model.config.tokenizer_model_max_length == 3000
    assert _generate(lm, mixed_requests()[:2], 1) == _generate(PmodLlava(pretrained=checkpoints["pmod_pad"],
                                                                          device="cpu"), mixed_requests()[:2], 1)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="customized_config=.*JSON object"):
        PmodLlava(pretrained=checkpoints["pmod_pad"], device="cpu", customized_config=str(bad))

