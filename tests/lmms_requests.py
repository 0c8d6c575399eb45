"""lmms-eval requests for the adapter tests (pmod_llava and pmod_hf): two in-memory tasks whose documents hold
different images for the same doc id, so an answer shows which task's document it used."""

from __future__ import annotations

from lmms_eval.api.instance import Instance

GREEDY = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["\n\n"]}


def two_tasks(images_a: list, images_b: list) -> dict:
    """lm.task_dict for tasks ci_a (split test) and ci_b (split val)."""
    return {"ci_a": {"test": [{"image": image} for image in images_a]},
            "ci_b": {"val": [{"image": image} for image in images_b]}}


def visual(doc):
    return [doc["image"]]


def request(kind, args):
    return Instance(kind, args, idx=0, metadata={"task": args[4], "doc_id": args[3], "repeats": 1})


def mixed_requests(gen_kwargs=GREEDY, docs: int = 4):
    """Two tasks, same kwargs, interleaved, prompts of different lengths: one chunk mixes tasks and splits."""
    requests = []
    for doc_id in range(docs):
        requests.append(request("generate_until", ("Describe" + " it" * doc_id + ".", dict(gen_kwargs), visual,
                                                   doc_id, "ci_a", "test")))
        requests.append(request("generate_until", ("What color?", dict(gen_kwargs), visual, doc_id, "ci_b", "val")))
    return requests


def generate(lm, requests, batch_size: int, task_dict: dict) -> list[str]:
    lm.batch_size_per_gpu = batch_size
    lm.task_dict = task_dict
    return [result.text for result in lm.generate_until(requests)]
