"""Inputs for the tiny transformers-native VLMs of ``llava.tiny_hf_models``, built offline for tests.

Every test gets the same small seeded model of a family (re-exported from ``llava.tiny_hf_models``) and the inputs
that family's processor would make, with no hub download: pixels from the family's image / video processor class,
and each placeholder run as long as the model's own feature count for that image (or video), so the ids match
what the family's full processor would produce.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from llava.tiny_hf_models import (  # noqa: F401  (re-exported: the tests' one import for tiny VLMs)
    BOS_ID,
    CONFIGS,
    EOS_ID,
    FAMILIES,
    IMAGE_TOKEN_ID,
    PAD_ID,
    QWEN_FAMILIES,
    QWEN_PIXELS,
    TILE,
    VIDEO_FAMILIES,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    image_processor,
    save_tiny_checkpoint,
    tiny_processor,
    tiny_vlm,
    video_processor,
    with_random_routers,
)

TEXT_TOKEN_IDS = range(EOS_ID + 1, IMAGE_TOKEN_ID)  # what a Sample's text may hold: no pad, BOS/EOS or visual id
VIDEO_FRAME_SIZE = (56, 56)  # (width, height) of every video frame


@dataclass(frozen=True)
class Sample:
    """One prompt: text, then its images (in order), then its video, then more text."""

    text_before: list[int]  # token ids before the visual part (may be empty)
    text_after: list[int]  # token ids after it
    image_sizes: tuple[tuple[int, int], ...] = ()  # (width, height) of each image; empty for a text-only sample
    video_frames: int = 0  # 0 = no video; else a video of that many frames (llava_onevision and Qwen families)


def random_pixels(shape: tuple[int, ...], seed: int, sample: Sample, item: str) -> torch.Tensor:
    """uint8 pixels seeded by the sample's own content, so a sample sees the same pixels alone or in any batch."""
    key = repr((seed, sample.text_before, sample.text_after, sample.image_sizes, sample.video_frames, item))
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)


def sample_images(sample: Sample, seed: int) -> list[torch.Tensor]:
    return [
        random_pixels((3, height, width), seed, sample, f"image {index}")
        for index, (width, height) in enumerate(sample.image_sizes)
    ]


def sample_video(sample: Sample, seed: int) -> torch.Tensor:
    width, height = VIDEO_FRAME_SIZE
    return random_pixels((sample.video_frames, 3, height, width), seed, sample, "video")


def processed_images(model, family: str, samples: list[Sample], seed: int) -> dict:
    """Pixel inputs for every image of the batch, in sample order (nothing when no sample has an image)."""
    per_sample = [sample_images(sample, seed) for sample in samples if sample.image_sizes]
    if not per_sample:
        return {}
    # OneVision takes images grouped by sample: a sample with several images gets no anyres tiles.
    images = per_sample if family == "llava_onevision" else [image for group in per_sample for image in group]
    return dict(image_processor(model.config, family)(images=images, return_tensors="pt"))


def processed_videos(model, family: str, samples: list[Sample], seed: int) -> dict:
    """Pixel inputs for every video of the batch, in sample order (nothing when no sample has a video)."""
    videos = [sample_video(sample, seed) for sample in samples if sample.video_frames]
    if not videos:
        return {}
    if family not in VIDEO_FAMILIES:
        raise ValueError(f"{family} takes no video; video samples are for {VIDEO_FAMILIES}")
    if family == "llava_onevision" and len({len(video) for video in videos}) > 1:
        raise ValueError("llava_onevision stacks a batch's videos into one tensor: give them equal frame counts")
    processor = video_processor(model.config, family)
    outputs = dict(processor(videos=videos, return_metadata=True, return_tensors="pt"))
    metadata = outputs.pop("video_metadata")
    if family == "qwen2_5_vl":
        # Its processor adds each video's seconds per temporal patch, which spaces the M-RoPE time positions.
        seconds = [processor.temporal_patch_size / video.sampled_fps for video in metadata]
        outputs["second_per_grid_ts"] = torch.tensor(seconds)
    return outputs


@torch.no_grad()
def feature_counts(model, method: str, pixel_inputs: dict) -> list[int]:
    """How many features the model makes for each image (or video): the length of its placeholder run."""
    if not pixel_inputs:
        return []
    return [len(features) for features in getattr(model, method)(**pixel_inputs).pooler_output]


def onevision_video_tokens(model, frames: int) -> int:
    """OneVision pools each frame's feature grid 2 x 2 and ends a video with one newline feature.

    Counted from the config: before transformers 5.24 the newline was added by the forward, not by
    get_video_features, so the model's feature count misses it there.
    """
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return frames * math.ceil(side / 2) ** 2 + 1


def video_feature_counts(model, family: str, samples: list[Sample], video_inputs: dict) -> list[int]:
    """The placeholder run length of each video of the batch, in sample order."""
    if family == "llava_onevision":
        return [onevision_video_tokens(model, sample.video_frames) for sample in samples if sample.video_frames]
    return feature_counts(model, "get_video_features", video_inputs)


def placeholder_run(family: str, token_id: int, count: int) -> list[int]:
    """Qwen wraps each image / video in vision start and end tokens; the LLaVA families use the bare run."""
    if family in QWEN_FAMILIES:
        return [VISION_START_ID, *[token_id] * count, VISION_END_ID]
    return [token_id] * count


def prompt_ids(family: str, samples: list[Sample], image_counts: list[int], video_counts: list[int]) -> list[list[int]]:
    image_runs, video_runs = iter(image_counts), iter(video_counts)
    prompts = []
    for sample in samples:
        visual = []
        for _ in sample.image_sizes:
            visual += placeholder_run(family, IMAGE_TOKEN_ID, next(image_runs))
        if sample.video_frames:
            visual += placeholder_run(family, VIDEO_TOKEN_ID, next(video_runs))
        prompts.append([*sample.text_before, *visual, *sample.text_after])
    return prompts


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> left-padded ids and the 0/1 attention mask, as a left-padding tokenizer returns them."""
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def mm_token_type_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """0 text, 1 image, 2 video: what the Qwen processors return and the Qwen models need for M-RoPE."""
    types = torch.zeros_like(input_ids)
    types[input_ids == IMAGE_TOKEN_ID] = 1
    types[input_ids == VIDEO_TOKEN_ID] = 2
    return types


def vlm_inputs(model, family: str, samples: list[Sample], seed: int = 0) -> dict:
    """Model inputs for a left-padded batch of ``samples``, as the family's processor would return them.

    input_ids and attention_mask, plus what the family needs (pixel_values, image_sizes, batch_num_images,
    image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts, mm_token_type_ids). Pixels are random,
    seeded by ``seed`` and the sample, and go through the family's image / video processor. Each placeholder run is
    as long as the model's feature count for that image or video, so ``model(**inputs)`` and
    ``model.generate(**inputs)`` run. llava_onevision stacks videos into one tensor: all videos of a batch need the
    same number of frames.
    """
    image_inputs = processed_images(model, family, samples, seed)
    video_inputs = processed_videos(model, family, samples, seed)
    image_counts = feature_counts(model, "get_image_features", image_inputs)
    video_counts = video_feature_counts(model, family, samples, video_inputs)
    input_ids, attention_mask = left_padded(prompt_ids(family, samples, image_counts, video_counts))
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, **image_inputs, **video_inputs)
    if family in QWEN_FAMILIES:
        inputs["mm_token_type_ids"] = mm_token_type_ids(input_ids)
    return inputs


def visual_token_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the positions the model fills with image or video features (its image / video token ids)."""
    visual_ids = [getattr(model.config, name, None) for name in ("image_token_id", "video_token_id")]
    return torch.isin(input_ids, torch.tensor([i for i in visual_ids if i is not None], device=input_ids.device))




def greedy_without_cache(model, inputs: dict, steps: int, banned: tuple[int, ...] = ()) -> list[int]:
    """Greedy tokens by recomputing the whole sequence each step (batch of one); ``banned`` ids never come out."""
    inputs = dict(inputs)
    tokens = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1]
        logits[list(banned)] = float("-inf")
        token = int(logits.argmax())
        tokens.append(token)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)],
                                                    dim=1)
    return tokens
