"""LLaVA's JSON training data: a lazily preprocessed dataset and the collator that batches it.

Data format (LLaVA's): a JSON list (or JSON Lines) of `{"id", "image"?, "conversations": [{"from", "value"}]}`,
image paths relative to `--image_folder`. The whole file is validated when the dataset is built, so a broken
record stops training before any compute is spent, with its index and id in the message. Errors found only
when a sample is read (a missing or unreadable image) are raised too, never skipped: a silently dropped
sample would change the data a run is trained on.
"""

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava.mm_utils import process_images
from llava.train.preprocess import check_turns, count_image_tags, preprocess

logger = logging.getLogger(__name__)

# LLaVA's length estimate for an image (tokens are counted in words; anyres images are longer in reality).
IMAGE_LENGTH_ESTIMATE = 128


def load_records(data_path: str) -> list:
    """The records of a `.json` list or a `.jsonl` file, with errors naming the file (and line)."""
    if not os.path.isfile(data_path):
        raise FileNotFoundError(f"--data_path {data_path!r} does not exist")
    with open(data_path, encoding="utf-8") as f:
        if data_path.endswith(".jsonl"):
            records = []
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{data_path}: line {line_no} is not valid JSON: {e}") from e
            return records
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{data_path} is not valid JSON: {e}") from e
    if not isinstance(records, list):
        raise ValueError(
            f"{data_path} must hold a JSON list of samples (LLaVA format), got a {type(records).__name__}"
        )
    return records


def _sample_name(index: int, record) -> str:
    sample_id = record.get("id") if isinstance(record, dict) else None
    return f"sample {index} (id {sample_id!r})"


def validate_record(record, is_multimodal: bool) -> None:
    """Structural checks that are cheap enough to run on every record up front."""
    if not isinstance(record, dict):
        raise ValueError(f"is a {type(record).__name__}, expected a dict with 'conversations'")
    if "conversations" not in record:
        raise ValueError("has no 'conversations'")
    turns = check_turns(record["conversations"])
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"'image' must be one relative path (a string), got {image!r:.120}")
    if image is not None and not is_multimodal:
        raise ValueError("has an image but the model has no vision tower (--vision_tower)")
    tags, images = count_image_tags(turns), int(image is not None)
    if tags > images:
        raise ValueError(f"has {tags} {DEFAULT_IMAGE_TOKEN} tag(s) but {images} image(s)")
    if tags < images:
        raise ValueError(f"has an image but no {DEFAULT_IMAGE_TOKEN} tag in its human turns")


def _has_image(record) -> bool:
    return record.get("image") is not None


def _word_count(record) -> int:
    return sum(len(turn["value"].split()) for turn in record["conversations"])


class LazySupervisedDataset(Dataset):
    """Reads and preprocesses one sample at a time; see the module docstring for the format and errors.

    `data_args` needs `image_folder`, `image_aspect_ratio`, `image_processor`, `is_multimodal`, `version`
    (conversation template name) and `image_grid_pinpoints` (anyres only).
    """

    def __init__(self, data_path: str, tokenizer, data_args):
        self.data_path = data_path
        self.tokenizer = tokenizer
        self.data_args = data_args
        self.records = load_records(data_path)
        is_multimodal = bool(getattr(data_args, "is_multimodal", False))
        for index, record in enumerate(self.records):
            try:
                validate_record(record, is_multimodal)
            except ValueError as e:
                raise ValueError(f"{data_path}: {_sample_name(index, record)} {e}") from e
        self._word_counts = [_word_count(record) for record in self.records]
        logger.info("Loaded %d samples from %s", len(self.records), data_path)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> List[int]:
        """Approximate sample lengths (words, plus a fixed estimate per image), for length grouping."""
        return [
            n + (IMAGE_LENGTH_ESTIMATE if _has_image(record) else 0)
            for n, record in zip(self._word_counts, self.records)
        ]

    @property
    def modality_lengths(self) -> List[int]:
        """Word counts, negative for text-only samples (LLaVA's convention for modality grouping)."""
        return [n if _has_image(record) else -n for n, record in zip(self._word_counts, self.records)]

    def _load_image(self, index: int, record) -> Image.Image:
        path = os.path.join(self.data_args.image_folder or "", record["image"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{_sample_name(index, record)}: image file not found: {path}")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{_sample_name(index, record)}: cannot read image {path}: {e}") from e

    def _zero_image(self) -> torch.Tensor:
        crop = self.data_args.image_processor.crop_size
        return torch.zeros(3, crop["height"], crop["width"])

    def __getitem__(self, index: int) -> Dict[str, object]:
        record = self.records[index]
        has_image = _has_image(record)
        try:
            sample = preprocess(record["conversations"], self.tokenizer, self.data_args.version, has_image)
        except ValueError as e:
            raise ValueError(f"{self.data_path}: {_sample_name(index, record)} {e}") from e
        if has_image:
            image = self._load_image(index, record)
            sample["image"] = process_images([image], self.data_args.image_processor, self.data_args)[0]
            sample["image_size"] = image.size
        elif getattr(self.data_args, "is_multimodal", False):
            sample["image"] = self._zero_image()
            sample["image_size"] = None
        return sample


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pads a list of samples into a batch.

    It does not truncate: a sequence's real length is known only after the model splices in the image
    features, so the model truncates to `tokenizer_model_max_length` there (and logs how many it cut).
    `attention_mask` comes from the true lengths, not from `input_ids != pad_token_id`, so a genuine
    `<unk>` (LLaVA pads with unk) is not masked out.
    """

    tokenizer: object

    def __call__(self, instances: Sequence[Dict[str, object]]) -> Dict[str, object]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token (LLaVA uses the unk token)")
        lengths = torch.tensor([len(inst["input_ids"]) for inst in instances])
        width = int(lengths.max())
        input_ids = torch.full((len(instances), width), pad_id, dtype=torch.long)
        labels = torch.full((len(instances), width), IGNORE_INDEX, dtype=torch.long)
        for row, inst in enumerate(instances):
            input_ids[row, : len(inst["input_ids"])] = inst["input_ids"]
            labels[row, : len(inst["labels"])] = inst["labels"]
        batch = dict(
            input_ids=input_ids,
            labels=labels,
            attention_mask=torch.arange(width)[None, :] < lengths[:, None],
        )
        if any("image" in inst for inst in instances):
            images = [inst["image"] for inst in instances]
            same_shape = all(image.shape == images[0].shape for image in images)
            batch["images"] = torch.stack(images) if same_shape else images
            batch["image_sizes"] = [inst.get("image_size") for inst in instances]
        return batch


def make_supervised_data_module(tokenizer, data_args) -> Dict[str, Optional[object]]:
    """The dataset/collator triple the Trainer needs; `data_args.data_path` names the training file."""
    train_dataset = LazySupervisedDataset(data_args.data_path, tokenizer, data_args)
    return dict(
        train_dataset=train_dataset,
        eval_dataset=None,
        data_collator=DataCollatorForSupervisedDataset(tokenizer=tokenizer),
    )
