"""One answer from a LLaVA / p-MoD LLaVA checkpoint for images and a question (LLaVA's `run_llava`).

    python -m llava.eval.run_llava --model-path CKPT --image-file a.png --query "What is in the image?"

or, as in LLaVA's README, from Python::

    from llava.eval.run_llava import eval_model
    args = type("Args", (), {"model_path": CKPT, "model_base": None, "model_name": None, "query": "...",
                             "conv_mode": None, "image_file": "a.png", "sep": ",", "temperature": 0,
                             "top_p": None, "num_beams": 1, "max_new_tokens": 512})()
    eval_model(args)

Images are file paths, http(s) URLs or base64 strings / data URIs; several are separated by `--sep`. The query
may say where each image goes with `<image-placeholder>`; otherwise the image tokens come first, as in LLaVA.
Without `--conv-mode` the template comes from the checkpoint (what it was trained with, else its name).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch
from PIL import Image

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
)
from llava.conversation import conv_templates, get_conv_template
from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token

logger = logging.getLogger(__name__)
BASE64 = re.compile(r"[A-Za-z0-9+/=\s]{200,}")


class InputError(ValueError):
    """Bad user input (a flag's value), reported as one line without a traceback by the CLIs."""


def load_image(source: str, flag: str = "--image-file") -> Image.Image:
    """An image from a file path, an http(s) URL, or a base64 string / data URI, as RGB."""
    from transformers.image_utils import load_image as load_remote_image

    is_file = _is_file(source)
    remote = source.startswith(("http://", "https://", "data:image/")) or BASE64.fullmatch(source) is not None
    if not is_file and not remote:
        raise InputError(f"{flag} {_shorten(source)}: no such file (nor a URL or base64 image)")
    try:
        if is_file:
            with Image.open(source) as image:
                return image.convert("RGB")
        return load_remote_image(source).convert("RGB")
    except Exception as error:  # PIL, network and base64 decoding raise their own types
        what = "is not a readable image" if is_file else "could not be downloaded or decoded"
        raise InputError(f"{flag} {_shorten(source)}: {what} ({type(error).__name__}: {error})") from error


def _is_file(source: str) -> bool:
    try:
        return Path(source).is_file()
    except (OSError, ValueError):  # a base64 payload can be too long for a file name
        return False


def _shorten(source: str) -> str:
    return source if len(source) <= 80 else source[:60] + "..."


def default_conv_mode(model, model_path: str) -> str:
    """The template the checkpoint was trained with (``conv_template`` in its config), else LLaVA's name rule."""
    recorded = getattr(model.config, "conv_template", None)
    if recorded in conv_templates and recorded != "plain":
        return recorded
    name = get_model_name_from_path(model_path).lower()
    for marker in ("llama-2", "llama_2", "mistral", "mpt", "34b"):
        if marker in name:
            logger.warning("%s: LLaVA would use its %s template, which this code base does not have; using "
                           "vicuna_v1 (pass --conv-mode to choose)", model_path, marker)
            return "vicuna_v1"
    return "llava_v1" if "v1" in name else "vicuna_v1"


def image_tag(config) -> str:
    """The text that stands for one image in a prompt (with start/end tokens when the checkpoint uses them)."""
    if getattr(config, "mm_use_im_start_end", False):
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return DEFAULT_IMAGE_TOKEN


def place_images(query: str, num_images: int, config) -> str:
    """`<image-placeholder>` -> the image tag; without placeholders (or image tags) the tags go first."""
    tag = image_tag(config)
    if IMAGE_PLACEHOLDER in query:
        return query.replace(IMAGE_PLACEHOLDER, tag)
    if num_images == 0 or DEFAULT_IMAGE_TOKEN in query:
        return query
    return "\n".join([tag] * num_images) + "\n" + query


def image_inputs(images: list[Image.Image], image_processor, model):
    """Preprocessed images on the model's device and dtype (a list for AnyRes images of different sizes)."""
    processed = process_images(images, image_processor, model.config)
    if isinstance(processed, list):
        return [image.to(model.device, model.dtype) for image in processed]
    return processed.to(model.device, model.dtype)


def sampling_kwargs(temperature: float, top_p: float | None, num_beams: int, max_new_tokens: int) -> dict:
    """generate() arguments: greedy at temperature 0, sampling above."""
    kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
        if top_p is not None:
            kwargs["top_p"] = top_p
    return kwargs


def answer(model, tokenizer, image_processor, query: str, images: list[Image.Image], conv_mode: str = "vicuna_v1",
           temperature: float = 0.0, top_p: float | None = None, num_beams: int = 1, max_new_tokens: int = 512,
           streamer=None) -> str:
    """The model's reply to `query` about `images` (a single user turn of template `conv_mode`)."""
    conversation = get_conv_template(conv_mode)
    conversation.append_message(conversation.roles[0], place_images(query, len(images), model.config))
    conversation.append_message(conversation.roles[1], None)
    return generate_reply(model, tokenizer, image_processor, conversation.get_prompt(), images,
                          sampling_kwargs(temperature, top_p, num_beams, max_new_tokens), streamer)


def generate_reply(model, tokenizer, image_processor, prompt: str, images: list[Image.Image], generate_kwargs: dict,
                   streamer=None) -> str:
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None].to(model.device)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad_token_id, use_cache=True,
            images=image_inputs(images, image_processor, model) if images else None,
            image_sizes=[image.size for image in images] if images else None,
            streamer=streamer, **generate_kwargs)
    if not images:  # without images generate() returns the prompt too
        output = output[:, input_ids.shape[1]:]
    return tokenizer.decode(output[0], skip_special_tokens=True).strip()


def load_for_inference(args):
    """(tokenizer, model, image_processor) from LLaVA-style args (model_path, model_base, load_8bit, ...)."""
    from llava.model.builder import load_pretrained_model

    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, getattr(args, "model_base", None), getattr(args, "model_name", None),
        load_8bit=getattr(args, "load_8bit", False), load_4bit=getattr(args, "load_4bit", False), device=device)
    return tokenizer, model, image_processor


def eval_model(args) -> str:
    """LLaVA's `eval_model(args)`: load the checkpoint, answer `args.query` about `args.image_file`, print it."""
    conv_mode = getattr(args, "conv_mode", None)
    if conv_mode is not None:
        get_conv_template(conv_mode)  # an unknown template fails before the model loads
    sep = getattr(args, "sep", ",")
    images = [load_image(source) for source in str(args.image_file).split(sep) if source]
    tokenizer, model, image_processor = load_for_inference(args)
    conv_mode = conv_mode or default_conv_mode(model, str(args.model_path))
    reply = answer(model, tokenizer, image_processor, args.query, images, conv_mode,
                   getattr(args, "temperature", 0.2), getattr(args, "top_p", None), getattr(args, "num_beams", 1),
                   getattr(args, "max_new_tokens", 512))
    print(reply)
    return reply


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags LLaVA's CLIs share."""
    parser.add_argument("--model-path", "--model_path", dest="model_path", required=True)
    parser.add_argument("--model-base", "--model_base", dest="model_base", default=None,
                        help="base LLM for a stage-1 (projector only) or LoRA folder")
    parser.add_argument("--conv-mode", "--conv_mode", dest="conv_mode", default=None,
                        help="conversation template (default: the one the checkpoint was trained with)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--load-8bit", "--load_8bit", dest="load_8bit", action="store_true")
    parser.add_argument("--load-4bit", "--load_4bit", dest="load_4bit", action="store_true")


def run_cli(main_function, argv=None) -> None:
    """Run a CLI's main; bad input (a flag's value, a checkpoint folder) exits with one line, not a traceback."""
    from llava.model.checkpoint_config import CheckpointConfigError
    from llava.model.quantization import QuantizationUnavailable
    from llava.model.tokenizer import TokenizerLoadError

    try:
        main_function(argv)
    except (InputError, CheckpointConfigError, TokenizerLoadError, QuantizationUnavailable) as error:
        sys.exit("error: " + " ".join(str(error).split()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--image-file", "--image_file", dest="image_file", required=True,
                        help="image path(s), URL(s) or base64, separated by --sep")
    parser.add_argument("--query", required=True)
    parser.add_argument("--sep", default=",")
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--top_p", "--top-p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=512)
    eval_model(parser.parse_args(argv))


if __name__ == "__main__":
    run_cli(main)
