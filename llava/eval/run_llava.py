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

import torch
from PIL import Image

from llava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
)
from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.serve.common import (
    add_model_arguments,
    default_conv_mode,
    load_for_inference,
    load_image,
    run_cli,
)


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
