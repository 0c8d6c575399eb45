"""Answer a question file with a checkpoint (LLaVA's `model_vqa_loader`), batched and resumable.

    python -m llava.eval.model_vqa_loader --model-path CKPT --question-file questions.jsonl \\
        --image-folder images/ --answers-file answers.jsonl [--num-chunks 8 --chunk-idx 0] [--batch-size 8]

The question file is LLaVA's JSON lines: ``{"question_id", "image" (optional, relative to --image-folder),
"text", ...}``; each answer line is ``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}``.
Batches are left-padded, so ``--batch-size`` does not change greedy answers. An interrupted run resumes: ids
already in the answers file are skipped and new answers are appended (answers already written are never
touched; only a half-written last line is removed).
"""

from __future__ import annotations

import argparse
import json
import math
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from llava.conversation import get_conv_template
from llava.eval.batching import left_pad
from llava.eval.run_llava import image_inputs, place_images, sampling_kwargs
from llava.mm_utils import get_model_name_from_path, tokenizer_image_token
from llava.serve.common import (
    InputError,
    add_model_arguments,
    default_conv_mode,
    load_for_inference,
    load_image,
    run_cli,
)


def get_chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """LLaVA's split: ``num_chunks`` contiguous chunks of ceil(len / num_chunks) items."""
    if not 0 <= chunk_idx < num_chunks:
        raise InputError(f"--chunk-idx {chunk_idx} must be in [0, --num-chunks {num_chunks})")
    size = math.ceil(len(items) / num_chunks) if items else 0
    return items[chunk_idx * size:(chunk_idx + 1) * size]


def read_questions(path: str) -> list[dict]:
    questions = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise InputError(f"--question-file {path}: cannot be read ({error})") from error
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            question = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"--question-file {path}, line {number}: not JSON ({error})") from error
        if not isinstance(question, dict) or "question_id" not in question or "text" not in question:
            raise InputError(f"--question-file {path}, line {number}: needs question_id and text")
        questions.append(question)
    return questions


def answered_ids(path: str) -> set:
    """Question ids already in the answers file; a half-written last line (a run killed mid-write) is dropped
    from the file, since it is no answer and would break readers of the file."""
    file = Path(path)
    if not file.is_file():
        return set()
    text = file.read_text()
    lines = text.splitlines()
    done = set()
    for number, line in enumerate(lines):
        try:
            done.add(json.loads(line)["question_id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            if number == len(lines) - 1 and not text.endswith("\n"):
                with open(file, "r+") as handle:
                    handle.truncate(len(text.encode()) - len(line.encode()))
    return done


class Answerer:
    """One loaded checkpoint answering batches of questions with one template and sampling setting."""

    def __init__(self, args):
        self.tokenizer, self.model, self.image_processor = load_for_inference(args)
        self.conv_mode = args.conv_mode or default_conv_mode(self.model, args.model_path)
        self.image_folder = Path(args.image_folder) if args.image_folder else None
        self.generate_kwargs = sampling_kwargs(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)
        self.model_id = get_model_name_from_path(args.model_path)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id

    def prompt(self, question: dict) -> str:
        conversation = get_conv_template(self.conv_mode)
        text = place_images(question["text"], 1 if question.get("image") else 0, self.model.config)
        conversation.append_message(conversation.roles[0], text)
        conversation.append_message(conversation.roles[1], None)
        return conversation.get_prompt()

    def image(self, question: dict):
        if self.image_folder is None:
            raise InputError(f"question {question['question_id']} has an image: pass --image-folder")
        return load_image(str(self.image_folder / question["image"]), flag=f"question {question['question_id']}")

    @torch.inference_mode()
    def answer(self, questions: list[dict]) -> list[str]:
        """Greedy / sampled answers of one batch; questions with and without an image go in separate calls."""
        replies = {}
        for with_image in (True, False):
            part = [q for q in questions if bool(q.get("image")) == with_image]
            if not part:
                continue
            ids = [tokenizer_image_token(self.prompt(q), self.tokenizer) for q in part]
            input_ids, attention_mask = left_pad(ids, self.pad_token_id)
            images = [self.image(q) for q in part] if with_image else []
            output = self.model.generate(
                input_ids.to(self.model.device), attention_mask=attention_mask.to(self.model.device),
                images=image_inputs(images, self.image_processor, self.model) if images else None,
                image_sizes=[image.size for image in images] if images else None,
                pad_token_id=self.pad_token_id, use_cache=True, **self.generate_kwargs)
            if not with_image:  # without images generate() returns the prompt too
                output = output[:, input_ids.shape[1]:]
            for question, tokens in zip(part, output.tolist()):
                replies[question["question_id"]] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return [replies[q["question_id"]] for q in questions]

    def record(self, question: dict, reply: str) -> dict:
        return {"question_id": question["question_id"], "prompt": question["text"], "text": reply,
                "answer_id": uuid.uuid4().hex, "model_id": self.model_id, "metadata": {}}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--image-folder", "--image_folder", dest="image_folder", default="")
    parser.add_argument("--question-file", "--question_file", dest="question_file", required=True)
    parser.add_argument("--answers-file", "--answers_file", dest="answers_file", required=True)
    parser.add_argument("--num-chunks", "--num_chunks", dest="num_chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", "--chunk_idx", dest="chunk_idx", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", "--top-p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    questions = get_chunk(read_questions(args.question_file), args.num_chunks, args.chunk_idx)
    done = answered_ids(args.answers_file)
    pending = [q for q in questions if q["question_id"] not in done]
    if not pending:
        print(f"all {len(questions)} questions of this chunk are already in {args.answers_file}")
        return
    answerer = Answerer(args)
    Path(args.answers_file).parent.mkdir(parents=True, exist_ok=True)
    with open(args.answers_file, "a") as answers, tqdm(total=len(questions), initial=len(questions) - len(pending),
                                                        desc="answering") as progress:
        for start in range(0, len(pending), args.batch_size):
            batch = pending[start:start + args.batch_size]
            for question, reply in zip(batch, answerer.answer(batch)):
                answers.write(json.dumps(answerer.record(question, reply)) + "\n")
            answers.flush()
            progress.update(len(batch))


if __name__ == "__main__":
    run_cli(main)
