"""Which image tokens a p-MoD LLaVA checkpoint keeps, per layer, for an image and a prompt; drawn as PNGs.

    python -m llava.demo.figures --model-path CKPT --image-file IMG --query "What color is the circle?" --out DIR

The kept tokens are recomputed outside the model: a pre-hook on every p-MoD layer records the routing
inputs it is given and a hook on its router records the router logits; `pmod.routing.select_tokens` on
those gives exactly the layer's own selection. The image-token geometry (padded square, or AnyRes base
image plus unpadded tile map with a newline token per row) comes from the checkpoint's config and tower.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.eval.prompting import build_prompt
from llava.mm_utils import (
    get_anyres_image_grid_shape,
    is_anyres,
    process_images,
    tokenizer_image_token,
)
from pmod.layer import PmodDecoderLayer
from pmod.routing import select_tokens
from pmod.visualize import TokenGrid, plot_keep_map, plot_kept_tokens


def _centred_box(width: int, height: int, side: float) -> tuple[float, float, float, float]:
    return ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)


def _anyres_tile_grid(config, image_size: tuple[int, int], tile: int, side: int, newline: bool) -> TokenGrid:
    """The unpadded tile map in image coordinates (the part of the letterboxed canvas that shows the image)."""
    width, height = image_size
    grid_w, grid_h = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, tile)
    canvas_w, canvas_h = grid_w * tile, grid_h * tile
    scale = min(canvas_w / width, canvas_h / height)
    left, top = -(canvas_w / scale - width) / 2, -(canvas_h / scale - height) / 2
    cell = tile / side / scale  # image pixels per token
    rows, cols = grid_h * side, grid_w * side
    first_row, first_col = 0, 0
    if width / height > cols / rows:  # the same integer arithmetic as llava.model.anyres_merge.unpad_image
        pad = (rows - int(height * (cols / width))) // 2
        first_row, rows = pad, rows - 2 * pad
    else:
        pad = (cols - int(width * (rows / height))) // 2
        first_col, cols = pad, cols - 2 * pad
    box = (left + first_col * cell, top + first_row * cell,
           left + (first_col + cols) * cell, top + (first_row + rows) * cell)
    canvas_box = (left, top, left + canvas_w / scale, top + canvas_h / scale)
    lines = tuple(((canvas_box[0] + i * tile / scale, canvas_box[1]), (canvas_box[0] + i * tile / scale, canvas_box[3]))
                  for i in range(1, grid_w))
    lines += tuple(((canvas_box[0], canvas_box[1] + j * tile / scale), (canvas_box[2], canvas_box[1] + j * tile / scale))
                   for j in range(1, grid_h))
    return TokenGrid(rows, cols, box, label=f"{grid_w}x{grid_h} tiles", row_end_tokens=int(newline), lines=lines)


def image_token_grids(model, image_size: tuple[int, int]) -> list[TokenGrid]:
    """Where each of an image's tokens sits on the (w, h) image, in sequence order."""
    config = model.config
    tower = model.get_vision_tower()
    side = tower.num_patches_per_side
    width, height = image_size
    aspect = getattr(config, "image_aspect_ratio", None) or "square"
    merge = getattr(config, "mm_patch_merge_type", None) or "flat"
    if is_anyres(aspect) and merge.startswith("spatial"):
        if aspect.startswith("anyres_max_"):
            raise NotImplementedError("token figures for anyres_max_N (resized tile maps) are not supported")
        base = TokenGrid(side, side, (0, 0, width, height), label="base image")
        return [base, _anyres_tile_grid(config, image_size, tower.config.image_size, side, "unpad" in merge)]
    if is_anyres(aspect):
        raise NotImplementedError(f"token figures for anyres with mm_patch_merge_type {merge!r} are not supported")
    padded_side = max(width, height) if aspect == "pad" else min(width, height)
    return [TokenGrid(side, side, _centred_box(width, height, padded_side), label="image")]


def record_kept_image_tokens(model, input_ids: torch.Tensor, images, image_sizes) -> dict[int, np.ndarray]:
    """{layer: kept flag of every image token} for one prompt; layers without routing keep every token."""
    routed = {index: layer for index, layer in enumerate(model.get_model().layers) if isinstance(layer, PmodDecoderLayer)}
    if not routed:
        raise ValueError("this checkpoint has no p-MoD layers (mod_target_layers is unset): nothing is routed")
    routing, logits, handles = {}, {}, []
    for index, layer in routed.items():
        handles.append(layer.register_forward_pre_hook(
            lambda module, args, kwargs, index=index: routing.__setitem__(index, kwargs.get("routing")),
            with_kwargs=True))
        handles.append(layer.router.register_forward_hook(
            lambda module, args, output, index=index: logits.__setitem__(index, output.detach())))
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), images=images,
                  image_sizes=image_sizes, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if not logits:
        raise RuntimeError("no p-MoD layer routed this input (does the prompt contain an image?)")
    any_routing = next(iter(routing.values()))
    target = any_routing.target_mask[0]
    kept = {}
    for index in range(model.config.num_hidden_layers):
        if index in logits:
            layer_routing = routing[index]
            selection = select_tokens(logits[index], layer_routing.target_mask, layer_routing.valid_mask,
                                      layer_routing.plan)
            kept[index] = selection.kept[0][target].cpu().numpy()
        else:
            kept[index] = np.ones(int(target.sum()), dtype=bool)
    return kept


def load_model(model_path: str, device: str = "cpu"):
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(model_path, device=device)
    return tokenizer, model, image_processor


def token_selection_figures(model, tokenizer, image_processor, image: Image.Image, query: str, out_dir: str | Path,
                            name: str = "sample", layers: list[int] | None = None,
                            conv_mode: str = "vicuna_v1") -> list[Path]:
    """Draw `<name>_kept_tokens.png` (image panels per layer) and `<name>_keep_map.png` (layers x tokens)."""
    image = image.convert("RGB")
    prompt = build_prompt(query, 1, conv_mode)
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    device = next(model.parameters()).device
    images = process_images([image], image_processor, model.config)
    images = ([t.to(device, model.dtype) for t in images] if isinstance(images, list)
              else images.to(device, model.dtype))
    kept = record_kept_image_tokens(model, input_ids.to(device), images, [image.size])
    grids = image_token_grids(model, image.size)
    chosen = layers if layers is not None else list(model.get_model().schedule.mod_layers)
    unknown = [layer for layer in chosen if layer not in kept]
    if unknown:
        raise ValueError(f"--layers {unknown}: the model has layers 0..{len(kept) - 1}")
    out_dir = Path(out_dir)
    title = f"{query}"
    return [
        plot_kept_tokens(image, grids, {layer: kept[layer] for layer in chosen}, out_dir / f"{name}_kept_tokens.png",
                         title=title),
        plot_keep_map(kept, out_dir / f"{name}_keep_map.png", title=title, grids=grids),
    ]


def figures_for_eval_samples(model_path, eval_json, image_folder, out_dir, count: int) -> list[Path]:
    """Figures for the first `count` held-out questions of the demo (one sample per question type first)."""
    tokenizer, model, image_processor = load_model(str(model_path))
    samples = json.loads(Path(eval_json).read_text())[:count]
    paths = []
    for sample in samples:
        image = Image.open(Path(image_folder) / sample["image"])
        name = f"{sample['id']}_{sample['question_type']}"
        paths += token_selection_figures(model, tokenizer, image_processor, image, sample["question"], out_dir, name)
    return paths


def _parse_layers(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers must be comma-separated integers, got {text!r}") from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True, help="a p-MoD LLaVA checkpoint folder")
    parser.add_argument("--image-file", required=True)
    parser.add_argument("--query", required=True, help="the question asked with the image")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--layers", type=_parse_layers, default=None,
                        help="comma-separated layers to draw on the image (default: every p-MoD layer)")
    parser.add_argument("--conv-mode", default="vicuna_v1")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not Path(args.image_file).is_file():
        parser.error(f"--image-file {args.image_file}: no such file")
    tokenizer, model, image_processor = load_model(args.model_path, args.device)
    paths = token_selection_figures(model, tokenizer, image_processor, Image.open(args.image_file), args.query,
                                    args.out, Path(args.image_file).stem, args.layers, args.conv_mode)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
