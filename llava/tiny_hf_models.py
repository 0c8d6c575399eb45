"""Tiny random transformers-native VLMs with their processors, built offline: LLaVA, LLaVA-NeXT, LLaVA-OneVision,
Qwen2-VL and Qwen2.5-VL at a size two CPU cores train in seconds.

Configs come from the transformers config classes, the image / video processors are the family's own classes
sized to the tiny towers, the tokenizer is a small byte-level BPE trained here with the family's special and
visual tokens at the model's ids, and the chat template is written in the family's style. ``save_tiny_checkpoint``
writes model and processor to a folder that ``AutoProcessor`` / ``AutoModelForImageTextToText`` (and
``pmod.hf.load_vlm``) load like a hub checkpoint: the embedded default of scripts/demo_hf.sh and the tests.

    python -m llava.tiny_hf_models --family qwen2_5_vl --out checkpoints/tiny-qwen2.5-vl
"""

from __future__ import annotations

import argparse

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

TILE = 56  # LLaVA-family vision input side: 14 px patches, a 4 x 4 feature grid per tile
QWEN_PIXELS = 28 * 28  # one merged Qwen visual token (2 x 2 patches of 14 px)


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llava.tiny_hf_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--out", required=True, help="folder to write the checkpoint to")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    save_tiny_checkpoint(args.family, args.out, tiny_vlm(args.family, args.layers, args.seed))
    print(args.out)


if __name__ == "__main__":
    main()
