"""Image and prompt utilities with LLaVA's semantics: image-token splicing, square/pad/anyres preprocessing.

Images are PIL images in and float tensors out; sizes are (width, height) throughout, as PIL reports them.
"""

import ast
import math
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX

Resolution = Tuple[int, int]

# LLaVA-NeXT grid sets, (columns, rows) of tiles, in the order the official p-MoD code lists them
# (the order decides exact ties in `select_best_resolution`).
_NEXT_GRIDS = {
    4: [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)],
    9: [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3), (3, 2), (2, 3), (3, 3), (2, 4), (4, 2)],
}


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether plain `tokenizer(text)` starts with BOS (Llama/Vicuna: yes); decides the single leading BOS."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def tokenizer_image_token(prompt, tokenizer, image_token_index=IMAGE_TOKEN_INDEX, return_tensors=None):
    """Tokenize the text between `<image>` tags independently and join the pieces with `image_token_index`.

    Like LLaVA, the sequence starts with one BOS when the tokenizer adds one, and nothing else is added.
    """
    pieces = [tokenizer(chunk, add_special_tokens=False).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    input_ids = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    for i, piece in enumerate(pieces):
        if i:
            input_ids.append(image_token_index)
        input_ids.extend(piece)
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"unsupported return_tensors {return_tensors!r} (use None or 'pt')")


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """Pad the shorter side symmetrically (floor offset) so the image becomes square."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    side = max(width, height)
    canvas = Image.new(pil_img.mode, (side, side), background_color)
    canvas.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return canvas


def parse_grid_pinpoints(grid_pinpoints) -> List[Resolution]:
    """Pinpoints as a list of (w, h); configs store a list, older ones a string to `literal_eval`."""
    if isinstance(grid_pinpoints, str):
        grid_pinpoints = ast.literal_eval(grid_pinpoints)
    if not grid_pinpoints:
        raise ValueError("image_grid_pinpoints is empty; anyres needs at least one (width, height) pinpoint")
    return [(int(w), int(h)) for w, h in grid_pinpoints]


def grid_pinpoints_from_flag(text: str, tile_size: int) -> List[List[int]]:
    """`--image_grid_pinpoints` as LLaVA-NeXT scripts write it: pixel pairs "[(336, 672), (672, 336), ...]", or a
    tile-grid range "(1x1),...,(3x3)" (every grid from the first to the last, times the tile size)."""
    grids = re.findall(r"\((\d+)x(\d+)\)", text)
    if grids and "..." in text:
        (first_w, first_h), (last_w, last_h) = (tuple(map(int, grid)) for grid in (grids[0], grids[-1]))
        return [[w * tile_size, h * tile_size] for w in range(first_w, last_w + 1) for h in range(first_h, last_h + 1)]
    if grids:
        return [[int(w) * tile_size, int(h) * tile_size] for w, h in grids]
    try:
        return [list(pair) for pair in parse_grid_pinpoints(text)]
    except (ValueError, SyntaxError, TypeError) as error:
        raise ValueError(f"--image_grid_pinpoints {text!r}: expected \"[(w, h), ...]\" in pixels or \"(1x1),...,(3x3)\" "
                         f"in tiles ({error})") from error


def anyres_grid_pinpoints(max_num_sub_images: int, tile_size: int) -> List[List[int]]:
    """The LLaVA-NeXT pinpoints (w, h) for at most `max_num_sub_images` tiles of `tile_size` pixels."""
    if max_num_sub_images not in _NEXT_GRIDS:
        valid = ", ".join(str(n) for n in sorted(_NEXT_GRIDS))
        raise ValueError(f"--max_num_sub_images {max_num_sub_images} is not supported; valid values: {valid}")
    return [[cols * tile_size, rows * tile_size] for cols, rows in _NEXT_GRIDS[max_num_sub_images]]


def select_best_resolution(original_size: Resolution, possible_resolutions: Sequence[Resolution]) -> Resolution:
    """The canvas that shows the most image pixels after an aspect-preserving fit, then wastes the least area;
    the first candidate wins exact ties."""
    orig_w, orig_h = original_size
    best, best_key = None, None
    for width, height in possible_resolutions:
        scale = min(width / orig_w, height / orig_h)
        effective = min(int(orig_w * scale) * int(orig_h * scale), orig_w * orig_h)
        key = (effective, -(width * height - effective))
        if best_key is None or key > best_key:
            best, best_key = (width, height), key
    return best


def resize_and_pad_image(image: Image.Image, target_resolution: Resolution) -> Image.Image:
    """Aspect-preserving resize to fit the target (ceil on the non-filling side), centred on black."""
    orig_w, orig_h = image.size
    target_w, target_h = target_resolution
    scale_w, scale_h = target_w / orig_w, target_h / orig_h
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(orig_h * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(orig_w * scale_h), target_w), target_h
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> List[Image.Image]:
    """Square tiles in row-major order (left to right, then top to bottom)."""
    width, height = image.size
    return [
        image.crop((left, top, left + patch_size, top + patch_size))
        for top in range(0, height, patch_size)
        for left in range(0, width, patch_size)
    ]


def get_anyres_image_grid_shape(image_size: Resolution, grid_pinpoints, tile_size: int) -> Resolution:
    """(columns, rows) of tiles chosen for an image of `image_size` (w, h); `tile_size` is the vision input
    size (e.g. 336), not the ViT patch size."""
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints))
    return width // tile_size, height // tile_size


def _processor_tile_sizes(image_processor) -> Tuple[int, int]:
    """(tile side, base side): LLaVA tiles at the crop size and squashes the base to the resize size."""
    crop = image_processor.crop_size["height"]
    size = getattr(image_processor, "size", None) or {}
    return crop, size.get("shortest_edge", crop)


def _preprocess(image_processor, images) -> torch.Tensor:
    return image_processor(images, return_tensors="pt")["pixel_values"]


def process_anyres_image(image: Image.Image, image_processor, grid_pinpoints) -> torch.Tensor:
    """[1 + tiles, 3, S, S]: the whole image squashed to S x S first, then the letterboxed tiles."""
    tile, base_side = _processor_tile_sizes(image_processor)
    best = select_best_resolution(image.size, parse_grid_pinpoints(grid_pinpoints))
    tiles = divide_to_patches(resize_and_pad_image(image, best), tile)
    base = image.resize((base_side, base_side), Image.Resampling.BICUBIC)
    return _preprocess(image_processor, [base] + tiles)


def is_anyres(image_aspect_ratio: Optional[str]) -> bool:
    return image_aspect_ratio == "anyres" or (image_aspect_ratio or "").startswith("anyres_max_")


def process_images(images: Sequence[Image.Image], image_processor, model_cfg) -> Union[torch.Tensor, list]:
    """Preprocess per `model_cfg.image_aspect_ratio` (square | pad | anyres | anyres_max_N); a stacked tensor
    when all results have one shape, else a list."""
    aspect = getattr(model_cfg, "image_aspect_ratio", None) or "square"
    images = [image.convert("RGB") for image in images]
    if aspect == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        processed = [_preprocess(image_processor, expand2square(image, background))[0] for image in images]
    elif is_anyres(aspect):
        pinpoints = getattr(model_cfg, "image_grid_pinpoints", None)
        if not pinpoints:
            raise ValueError(
                f"image_aspect_ratio {aspect!r} needs image_grid_pinpoints (set --max_num_sub_images "
                "or --image_grid_pinpoints)"
            )
        processed = [process_anyres_image(image, image_processor, pinpoints) for image in images]
    elif aspect == "square":
        processed = list(_preprocess(image_processor, images))
    else:
        raise ValueError(
            f"unknown --image_aspect_ratio {aspect!r}; valid: square, pad, anyres, anyres_max_<N>"
        )
    if all(p.shape == processed[0].shape for p in processed):
        return torch.stack(processed, dim=0)
    return processed


def load_image_processor(path: str, **kwargs):
    """The image processor of a vision-tower folder, preferring the PIL backend (no torchvision needed and the
    resampling LLaVA's preprocessing used)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(path, backend="pil", **kwargs)
    except TypeError:
        return AutoImageProcessor.from_pretrained(path, use_fast=False, **kwargs)


def get_model_name_from_path(model_path: str) -> str:
    """Last path component, or `<parent>_<checkpoint-N>` for a Trainer checkpoint folder."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]
