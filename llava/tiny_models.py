"""Tiny, offline, deterministic model folders (tokenizer + Llama, CLIP vision tower) for tests and demos.

Everything is built from configs and a built-in corpus, so no hub access is ever needed, and the same seed
always gives the same weights. The folders load with the usual `from_pretrained` calls, exactly like the real
models they stand in for (Vicuna-style Llama, CLIP ViT).
"""

import argparse
import os
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
TINY_VOCAB_SIZE = 1000
TINY_MODEL_MAX_LENGTH = 2048
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_CORPUS_LINES = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: <image>\nWhat is in the image? ASSISTANT: A red circle on a blue square.</s>",
    "USER: Describe the picture. ASSISTANT: The picture shows a green triangle.</s>",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Describe the image concisely. Provide a brief description of the given image.",
    "What color is the shape? What shape is it? How many objects are there? Where is it?",
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver",
    "circle square triangle rectangle star line dot box ball cube oval diamond heart cross arrow",
    "zero one two three four five six seven eight nine ten eleven twelve hundred thousand",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 336 672 1000 2024",
    "the a an of to and in is it that was for on are with as at be this have from or by not but",
    "what all were when we there can your which their said if do will each about how up out them",
    "then she many some so these would other into has more her two like him see time could no make",
    "than first been its who now people my made over did down only way find use may water long little",
    "very after words called just where most know get through back much before go good new write our",
    "used me man too any day same right look think also around another came come work three word must",
    "because does part even place well such here take why things help put years different away again",
    "left right top bottom middle center large small big tiny bright dark light image picture photo",
    "cat dog car tree house person woman man child bird horse sky road table chair book phone",
    "Yes. No. Maybe. The answer is yes. The answer is no. It is a photo of a street.",
    "Question: What is shown? Answer: A small yellow star above a large purple rectangle.",
    "Hello, world! How are you today? I am fine, thank you. Let's learn about pictures and words.",
    "people often walk along the river near the old bridge while children play games in the park",
    "the quick brown fox jumps over the lazy dog beside a quiet lake under the evening sky",
    "please explain the scene in detail, including colors, positions, sizes, shapes and counts",
    "there are several objects: a round ball, a wooden table, an open window and a sleeping cat",
    "the train arrives at the station every morning; passengers read newspapers and drink coffee",
    "students study mathematics, science, history and language at school during the week",
    "Is there a person in the image? Is the object on the left or on the right side?",
    "The text in the image says: open, closed, stop, exit, welcome, sale, menu, price.",
]


def training_corpus():
    """The training text, repeated so that frequent template words win merges over rare ones."""
    return [line for line in _CORPUS_LINES for _ in range(3)]


def build_tiny_tokenizer(out_dir: str) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (round-trips any text) with Llama's special ids and BOS-only post-processing."""
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=UNK_TOKEN,
        padding_side="right",
        model_max_length=TINY_MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def _seeded_init(seed: int, build):
    """Run `build` under a private RNG state so callers' global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def build_tiny_llama(
    out_dir: str,
    tokenizer,
    num_layers: int = 4,
    hidden: int = 64,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 4,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A random Llama (Vicuna-shaped: untied head, bos 1, eos 2, pad 0) saved with its tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = _seeded_init(seed, lambda: LlamaForCausalLM(config))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return model


def build_tiny_clip(
    out_dir: str,
    image_size: int = 56,
    patch_size: int = 14,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
) -> CLIPVisionModel:
    """A random CLIP ViT plus the PIL-backend CLIP image processor (no torchvision needed)."""
    config = CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    model = _seeded_init(seed, lambda: CLIPVisionModel(config))
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        resample=3,
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return model


@dataclass(frozen=True)
class TinyModelPaths:
    llm: str
    vision_tower: str


def build_tiny_models(
    root: str,
    num_layers: int = 4,
    hidden: int = 64,
    image_size: int = 56,
    seed: int = 0,
) -> TinyModelPaths:
    """Build `root/tiny-llama` (LLM + tokenizer) and `root/tiny-clip` (vision tower + processor)."""
    paths = TinyModelPaths(llm=os.path.join(root, "tiny-llama"), vision_tower=os.path.join(root, "tiny-clip"))
    tokenizer = build_tiny_tokenizer(paths.llm)
    build_tiny_llama(paths.llm, tokenizer, num_layers=num_layers, hidden=hidden, intermediate=2 * hidden, seed=seed)
    build_tiny_clip(paths.vision_tower, image_size=image_size, seed=seed)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build tiny offline model folders for tests and demos.")
    parser.add_argument("--out", required=True, help="folder that receives tiny-llama/ and tiny-clip/")
    parser.add_argument("--layers", type=int, default=4, help="number of Llama decoder layers")
    parser.add_argument("--hidden", type=int, default=64, help="Llama hidden size (intermediate = 2x)")
    parser.add_argument("--image-size", type=int, default=56, help="CLIP input size (multiple of 14)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.image_size % 14:
        parser.error(f"--image-size must be a multiple of the patch size 14, got {args.image_size}")
    if args.hidden % 4:
        parser.error(f"--hidden must be divisible by the 4 attention heads, got {args.hidden}")
    paths = build_tiny_models(
        args.out, num_layers=args.layers, hidden=args.hidden, image_size=args.image_size, seed=args.seed
    )
    print(paths.llm)
    print(paths.vision_tower)


if __name__ == "__main__":
    main()
