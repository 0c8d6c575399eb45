"""LLaVA-format JSON data for transformers-native VLMs, through the model's own processor and chat template.

Each sample's conversation becomes chat messages (``<image>`` tags become image parts, in place); the chat
template renders it, and the loss covers exactly the assistant turns: the text each assistant message adds to
the rendering of the conversation before it (its end-of-turn token included). Batches go through the
processor in one call, which expands every image placeholder to its number of visual tokens the way the
family does; labels follow the expansion.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava.train.preprocess import check_turns

logger = logging.getLogger(__name__)
ROLES = {"human": "user", "gpt": "assistant"}


def content_parts(text: str) -> list[dict]:
    """A LLaVA message's text as chat-template content parts: each ``<image>`` tag an image part, in place."""
    parts = []
    for number, piece in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if number:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns -> chat messages."""
    return [{"role": ROLES[turn["from"]], "content": content_parts(turn["value"])} for turn in conversations]


def assistant_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    text = processor.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = processor.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = processor.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render a conversation as the sum of its turns; "
                             "assistant tokens cannot be located")
        spans.append((len(before), len(through)))
    return text, spans


def text_labels(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (placeholders unexpanded) and their labels: the ids inside assistant spans."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        inside = end > start and any(span_start <= start and end <= span_end for span_start, span_end in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return encoded["input_ids"], labels


def expand_labels(expanded: list[int], ids: list[int], labels: list[int], visual_ids: set[int]) -> list[int]:
    """Labels for the processor's ids, where each visual placeholder of ``ids`` became a run of it."""
    result, position = [], 0
    for token, label in zip(ids, labels):
        if position >= len(expanded) or expanded[position] != token:
            raise ValueError(f"processor ids diverge from the template's at position {position}")
        position += 1
        result.append(label)
        if token in visual_ids:
            while position < len(expanded) and expanded[position] == token:
                result.append(IGNORE_INDEX)
                position += 1
    if position != len(expanded):
        raise ValueError("processor ids hold more tokens than the template's")
    return result


@dataclass
class ChatSample:
    text: str
    images: list[Image.Image]
    ids: list[int]  # the rendered conversation's tokens, visual placeholders unexpanded
    labels: list[int]


class ChatDataset(Dataset):
    """A LLaVA JSON list (``id``, optional ``image`` / ``images``, ``conversations``) rendered for a processor."""

    def __init__(self, data_path: str, image_folder: str | None, processor):
        try:
            self.records = json.loads(Path(data_path).read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"--data_path {data_path}: not a readable JSON file ({error})") from error
        if not isinstance(self.records, list):
            raise ValueError(f"--data_path {data_path}: expected a JSON list of samples")
        self.image_folder = Path(image_folder) if image_folder else None
        self.processor = processor
        logger.info("Loaded %d samples from %s", len(self.records), data_path)

    def __len__(self) -> int:
        return len(self.records)

    def _images(self, index: int, record: dict) -> list[Image.Image]:
        names = record.get("images") or ([record["image"]] if record.get("image") else [])
        images = []
        for name in names:
            path = (self.image_folder or Path(".")) / name
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except OSError as error:
                raise ValueError(f"sample {index} ({record.get('id')}): cannot read image {path} ({error})") from error
        return images

    def __getitem__(self, index: int) -> ChatSample:
        record = self.records[index]
        try:
            turns = check_turns(record["conversations"])
            messages = to_messages(turns)
            tags = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in turns)
            images = self._images(index, record)
            if tags != len(images):
                raise ValueError(f"{tags} <image> tags for {len(images)} images")
            text, spans = assistant_spans(self.processor, messages)
            ids, labels = text_labels(self.processor.tokenizer, text, spans)
        except (KeyError, ValueError) as error:
            raise ValueError(f"sample {index} ({record.get('id')}): {error}") from error
        return ChatSample(text, images, ids, labels)


class ChatCollator:
    """One processor call per batch (the family's own image batching), labels aligned to its ids.

    ``image_in_every_batch`` (set for distributed training) adds a label-free row holding one blank image to a
    batch without images: every rank then runs the vision tower and projector each step, which ZeRO-3 needs
    (ranks gather the same parameters in the same order) and DDP too (every trained parameter gets a
    gradient). The row has no labels, so the loss and gradients are those of the real rows.
    """

    def __init__(self, processor, visual_ids: set[int], image_in_every_batch: bool = False):
        self.processor = processor
        self.visual_ids = visual_ids
        self.image_in_every_batch = image_in_every_batch

    def _blank_image_row(self) -> ChatSample:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "."}]}]
        text = self.processor.apply_chat_template(messages, tokenize=False)
        return ChatSample(text, [Image.new("RGB", (56, 56), (255, 255, 255))], [], [])

    def __call__(self, samples: list[ChatSample]) -> dict:
        blank = self.image_in_every_batch and not any(sample.images for sample in samples)
        rows = samples + [self._blank_image_row()] if blank else samples
        images = [image for sample in rows for image in sample.images]
        batch = self.processor(text=[sample.text for sample in rows], images=images or None, padding=True,
                               return_tensors="pt")
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, sample in enumerate(samples):
            valid = batch["attention_mask"][row].bool()
            expanded = batch["input_ids"][row][valid].tolist()
            labels[row, valid] = torch.tensor(expand_labels(expanded, sample.ids, sample.labels, self.visual_ids))
        batch["labels"] = labels
        return dict(batch)
