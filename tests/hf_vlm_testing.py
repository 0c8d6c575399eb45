"""Tiny random transformers-native vision-language models and their inputs, built offline for tests.

The p-MoD code drives the VLMs transformers ships (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL).
These builders give every test the same small seeded model of a family and the inputs that family's processor
would make, with no hub download: configs come from the transformers config classes, pixels from the family's
image / video processor class built from its defaults, and each placeholder run is as long as the model's own
feature count for that image (or video), so the ids match what the family's full processor would produce.
tiny_processor builds that full processor offline (a small trained tokenizer, the same image / video processors, a
chat template in the family's style), and save_tiny_checkpoint writes model and processor to a folder the Auto
classes load, for tests of the path users take.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    SiglipVisionConfig,
)

FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 512
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_ID, VISION_END_ID = 508, 509, 510, 511
TEXT_TOKEN_IDS = range(EOS_ID + 1, IMAGE_TOKEN_ID)  # what a Sample's text may hold: no pad, BOS/EOS or visual id

TILE = 56  # LLaVA-family vision input side: 14 px patches, a 4 x 4 feature grid per tile
QWEN_PIXELS = 28 * 28  # one merged Qwen visual token (2 x 2 patches of 14 px)
VIDEO_FRAME_SIZE = (56, 56)  # (width, height) of every video frame


def text_config_kwargs(num_layers: int) -> dict:
    """The shared tiny decoder: big enough for GQA and long vision runs, small enough for 2 CPU cores."""
    return dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.1,
        rms_norm_eps=1e-5, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
    )


def tiny_vision_kwargs() -> dict:
    """CLIP / SigLIP towers: two layers so LLaVA's second-to-last-layer features exist."""
    return dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=TILE,
        patch_size=14,
    )


def anyres_pinpoints(max_tiles_per_side: int) -> list[list[int]]:
    """Every (height, width) grid of TILE-sized tiles up to the given side, as LLaVA-NeXT/OneVision list them."""
    sides = range(1, max_tiles_per_side + 1)
    return [[TILE * rows, TILE * cols] for rows in sides for cols in sides]


def llava_config(num_layers: int) -> LlavaConfig:
    return LlavaConfig(
        text_config=LlamaConfig(**text_config_kwargs(num_layers)),
        vision_config=CLIPVisionConfig(**tiny_vision_kwargs()),
        image_token_id=IMAGE_TOKEN_ID,
    )


def llava_next_config(num_layers: int) -> LlavaNextConfig:
    # Up to 2 x 2 tiles: wide, tall and square images pick different grids, then lose their padding rows.
    return LlavaNextConfig(
        text_config=LlamaConfig(**text_config_kwargs(num_layers)),
        vision_config=CLIPVisionConfig(**tiny_vision_kwargs()),
        image_token_id=IMAGE_TOKEN_ID, image_grid_pinpoints=anyres_pinpoints(2),
    )


def llava_onevision_config(num_layers: int) -> LlavaOnevisionConfig:
    # Up to 4 x 4 tiles: big images exceed anyres_max_9 and take OneVision's feature down-sampling path.
    return LlavaOnevisionConfig(
        text_config=Qwen2Config(**text_config_kwargs(num_layers)),
        vision_config=SiglipVisionConfig(**tiny_vision_kwargs(), vision_use_head=False),
        image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, image_grid_pinpoints=anyres_pinpoints(4),
    )


def qwen_text_config_kwargs(num_layers: int) -> dict:
    """M-RoPE splits the 16-dim heads' 8 rotary frequencies into temporal / height / width sections."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return dict(text_config_kwargs(num_layers), rope_parameters=rope)


def qwen_token_ids() -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN_ID, video_token_id=VIDEO_TOKEN_ID, vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def qwen2_vl_config(num_layers: int) -> Qwen2VLConfig:
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2)
    return Qwen2VLConfig(text_config=qwen_text_config_kwargs(num_layers), vision_config=vision, **qwen_token_ids())


def qwen2_5_vl_config(num_layers: int) -> Qwen2_5_VLConfig:
    # A 56 px window (2 x 2 merged tokens) on layer 0 and full attention on layer 1: both vision paths run.
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, window_size=56,
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(text_config=qwen_text_config_kwargs(num_layers), vision_config=vision, **qwen_token_ids())


# The image-text-to-text auto class turns each into LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
# LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration and Qwen2_5_VLForConditionalGeneration.
CONFIGS = {
    "llava": llava_config,
    "llava_next": llava_next_config,
    "llava_onevision": llava_onevision_config,
    "qwen2_vl": qwen2_vl_config,
    "qwen2_5_vl": qwen2_5_vl_config,
}


def tiny_vlm(family: str, num_layers: int = 6, seed: int = 0):
    """A tiny random model of ``family`` in eval mode, float32, attn_implementation='sdpa'.

    Text model: hidden 64, 4 heads, 2 KV heads, intermediate 128, vocab 512, 4096 positions. Vision tower: 2 layers,
    hidden 32. Image / video token ids are inside the vocabulary. The generation config has no EOS, so greedy
    runs always make ``max_new_tokens`` and a batch row lines up with the same sample run alone.
    """
    config = CONFIGS[family](num_layers)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return model


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


def image_processor(config, family: str):
    """The family's own image processor class, sized from the tiny model's config instead of a hub checkpoint."""
    if family in QWEN_FAMILIES:
        return Qwen2VLImageProcessor(size={"shortest_edge": QWEN_PIXELS, "longest_edge": 16 * QWEN_PIXELS})
    side = config.vision_config.image_size
    if family == "llava":
        return CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    if family == "llava_next":
        return LlavaNextImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side},
            image_grid_pinpoints=config.image_grid_pinpoints,
        )
    return LlavaOnevisionImageProcessor(
        size={"height": side, "width": side}, image_grid_pinpoints=config.image_grid_pinpoints,
    )


def video_processor(config, family: str):
    """The family's own video processor class; Qwen's per-frame pixel cap is set so no release warns about it."""
    if family in QWEN_FAMILIES:
        return Qwen2VLVideoProcessor(
            size={"shortest_edge": QWEN_PIXELS, "longest_edge": 4 * QWEN_PIXELS}, cap_pixels_per_frame=False,
        )
    side = config.vision_config.image_size
    return LlavaOnevisionVideoProcessor(size={"height": side, "width": side})


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


# A few lines of chat-like English to train the tiny tokenizers on: enough distinct words for 249 BPE merges, so the
# trained vocabulary ends exactly at IMAGE_TOKEN_ID, and the prompts of the chat templates below stay short.
TOKENIZER_CORPUS = (
    (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions."
    ),
    "USER: What is shown in the image? ASSISTANT: The picture shows a small red cat sitting on a wooden table.",
    "What color is the car in this photo? The car is blue and it is parked on the street in front of a house.",
    "Describe the video in detail. A dog runs across the green field, jumps over a fence and catches a ball.",
    "How many people are in the picture? There are three people standing near the river under a bright sky.",
    "Please answer the question briefly. Yes. No. Two apples and one orange lie on the plate.",
    "You are a helpful assistant. The user asks about pictures, videos, objects, colors, numbers and places.",
    "system user assistant Question Answer Describe Explain Where Which Why When Who",
    "The quick brown fox jumps over the lazy dog while birds sing in the tall trees of the old park.",
)

# pad, BOS (LLaVA's Llama tokenizer adds it to every prompt) or ChatML's turn start, EOS: ids PAD_ID, BOS_ID, EOS_ID.
LLAVA_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The strings of the model's visual ids, from IMAGE_TOKEN_ID on (image, video, vision start, vision end).
VISUAL_TOKENS = {
    "llava": ("<image>",),
    "llava_next": ("<image>",),
    "llava_onevision": ("<image>", "<video>"),
    "qwen2_vl": ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
    "qwen2_5_vl": ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"),
}


# Chat templates written for these tests in each family's style. Message content is a string or a list of
# {"type": "text" | "image" | "video", ...} parts. Assistant text sits in {% generation %} blocks, so
# apply_chat_template(..., return_assistant_tokens_mask=True) marks the tokens a training loss is computed on: what
# the model generates after the generation prompt, up to and including the EOS.
# LLaVA-1.5 / vicuna v1: "[system ]USER: <image>\nquestion ASSISTANT: answer</s>USER: ... ASSISTANT:".
LLAVA_CHAT_TEMPLATE = r"""
{%- for message in messages -%}
    {%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string
        else message['content'] -%}
    {%- set text = parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}
    {%- if loop.first and message['role'] != 'system' and default_system -%}
        {{- default_system + ' ' -}}
    {%- endif -%}
    {%- if message['role'] == 'system' -%}
        {{- text + ' ' -}}
    {%- elif message['role'] == 'user' -%}
        {{- 'USER: ' + '<image>\n' * (parts | selectattr('type', 'equalto', 'image') | list | length) + text + ' ' -}}
    {%- else -%}
        {{- 'ASSISTANT:' -}}{%- generation -%}{{- ' ' + text + '</s>' -}}{%- endgeneration -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- 'ASSISTANT:' -}}
{%- endif -%}
"""
# ChatML, visual parts in place: "<|im_start|>user\n<image markup>question<|im_end|>\n<|im_start|>assistant\n".
CHATML_CHAT_TEMPLATE = r"""
{%- for message in messages -%}
    {%- set parts = [{'type': 'text', 'text': message['content']}] if message['content'] is string
        else message['content'] -%}
    {{- '<|im_start|>' + message['role'] + '\n' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}
            {{- parts | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') + '<|im_end|>' -}}
        {%- endgeneration -%}
    {%- else -%}
        {%- for part in parts -%}
            {%- if part['type'] == 'image' -%}
                {{- image_markup -}}
            {%- elif part['type'] == 'video' -%}
                {{- video_markup -}}
            {%- else -%}
                {{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
        {{- '<|im_end|>' -}}
    {%- endif -%}
    {{- '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""
QWEN_MARKUP = (
    "{%- set image_markup = '<|vision_start|><|image_pad|><|vision_end|>' -%}"
    "{%- set video_markup = '<|vision_start|><|video_pad|><|vision_end|>' -%}"
)
CHAT_TEMPLATES = {
    "llava": "{%- set default_system = '' -%}" + LLAVA_CHAT_TEMPLATE,
    "llava_next": '{%- set default_system = "' + TOKENIZER_CORPUS[0] + '" -%}' + LLAVA_CHAT_TEMPLATE,
    "llava_onevision": r"{%- set image_markup = '<image>\n' -%}{%- set video_markup = '<video>\n' -%}"
    + CHATML_CHAT_TEMPLATE,
    "qwen2_vl": QWEN_MARKUP + CHATML_CHAT_TEMPLATE,
    "qwen2_5_vl": QWEN_MARKUP + CHATML_CHAT_TEMPLATE,
}


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on TOKENIZER_CORPUS with the family's special and visual tokens at the model's ids.

    Byte-level, so any text encodes without an unknown token. Saved as a plain tokenizers-backed tokenizer: the
    family's own tokenizer classes rebuild their pre-tokenizer from scratch on load, which would not match this one.
    Pads on the left, as vlm_inputs does, for batched generation. Holds the family's chat template too, as hub
    tokenizers do (and as one loaded from a save_tiny_checkpoint folder does).
    """
    chatml = family not in ("llava", "llava_next")
    pad, bos, eos = CHATML_SPECIAL_TOKENS if chatml else LLAVA_SPECIAL_TOKENS
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=IMAGE_TOKEN_ID, special_tokens=[pad, bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TOKENIZER_CORPUS, trainer)
    backend.add_special_tokens(list(VISUAL_TOKENS[family]))
    assert backend.token_to_id(VISUAL_TOKENS[family][0]) == IMAGE_TOKEN_ID, "the corpus gave too few merges"
    if not chatml:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, BOS_ID)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, bos_token=None if chatml else bos, eos_token=eos,
        padding_side="left", model_max_length=4096, chat_template=CHAT_TEMPLATES[family],
    )


def tiny_processor(family: str):
    """The family's own transformers processor, built offline to match ``tiny_vlm(family)``.

    LlavaProcessor, LlavaNextProcessor, LlavaOnevisionProcessor, Qwen2VLProcessor or Qwen2_5_VLProcessor with
    tiny_tokenizer(family), the image (and video) processors vlm_inputs uses and the family-style chat template,
    so that ``processor(text=..., images=..., videos=..., return_tensors="pt")`` expands each placeholder to the
    model's feature count and gives what vlm_inputs gives for the same token ids and pixels.
    """
    config = CONFIGS[family](1)
    parts = dict(
        image_processor=image_processor(config, family), tokenizer=tiny_tokenizer(family),
        chat_template=CHAT_TEMPLATES[family],
    )
    if family in VIDEO_FAMILIES:
        parts["video_processor"] = video_processor(config, family)
    if family == "qwen2_vl":
        return Qwen2VLProcessor(**parts)
    if family == "qwen2_5_vl":
        return Qwen2_5_VLProcessor(**parts)
    vision = config.vision_config
    if family == "llava_onevision":
        return LlavaOnevisionProcessor(
            **parts, num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio,
        )
    # CLIP's class token is one more feature, which the "default" feature selection drops again.
    processor_class = LlavaProcessor if family == "llava" else LlavaNextProcessor
    return processor_class(
        **parts, patch_size=vision.patch_size, num_additional_image_tokens=1,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )


def with_random_routers(model):
    """Routers that rank tokens differently (zero-initialised routers tie, and keep the first tokens)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".router." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def save_tiny_checkpoint(family: str, folder, model=None) -> str:
    """``tiny_vlm(family)`` (or ``model``, e.g. a p-MoD one) and ``tiny_processor(family)`` in one folder, as a hub
    checkpoint holds them.

    AutoProcessor.from_pretrained(folder) and AutoModelForImageTextToText.from_pretrained(folder) load it offline,
    so tests can drive the loading path users take. Returns the folder path.
    """
    folder = str(folder)
    (model if model is not None else tiny_vlm(family)).save_pretrained(folder)
    tiny_processor(family).save_pretrained(folder)
    return folder
