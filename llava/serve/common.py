"""What LLaVA's command-line tools share: the model flags, loading, the template choice, images from paths,
URLs or base64, and one-line errors for bad input (no tracebacks for a wrong flag value or folder)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import torch
from PIL import Image

from llava.conversation import conv_templates
from llava.mm_utils import get_model_name_from_path

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


def load_for_inference(args):
    """(tokenizer, model, image_processor) from LLaVA-style args (model_path, model_base, load_8bit, ...)."""
    from llava.model.builder import load_pretrained_model

    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path, getattr(args, "model_base", None), getattr(args, "model_name", None),
        load_8bit=getattr(args, "load_8bit", False), load_4bit=getattr(args, "load_4bit", False), device=device,
        reducer=getattr(args, "reducer", None))
    return tokenizer, model, image_processor


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
    parser.add_argument("--reducer", default=None,
                        help="training-free vision-token reducer for a dense checkpoint, e.g. fastv_k2_keep0.25 "
                             "(docs/reducers.md)")


def run_cli(main_function, argv=None) -> None:
    """Run a CLI's main; bad input (a flag's value, a checkpoint folder) exits with one line, not a traceback."""
    from llava.model.checkpoint_config import CheckpointConfigError
    from llava.model.quantization import QuantizationUnavailable
    from llava.model.tokenizer import TokenizerLoadError

    try:
        main_function(argv)
    except (InputError, CheckpointConfigError, TokenizerLoadError, QuantizationUnavailable) as error:
        sys.exit("error: " + " ".join(str(error).split()))
