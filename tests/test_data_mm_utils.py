"""Image-token splicing, square/pad/anyres preprocessing, and bit-exact parity with the official pipeline."""

import hashlib
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import (
    anyres_grid_pinpoints,
    divide_to_patches,
    expand2square,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    load_image_processor,
    process_anyres_image,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
    tokenizer_image_token,
)
from llava.tiny_models import CLIP_MEAN, CLIP_STD, build_tiny_tokenizer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "official_pmod")
NEXT_PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def small_processor(side=28):
    return CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3,
    )


def gradient_image(width, height):
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 60.0, np.float32)], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_tokenizer_image_token_splices_sentinel_with_one_bos(tokenizer):
    ids = tokenizer_image_token("Look <image>\nWhat is it?", tokenizer)
    before = tokenizer("Look ", add_special_tokens=False).input_ids
    after = tokenizer("\nWhat is it?", add_special_tokens=False).input_ids
    assert ids == [tokenizer.bos_token_id] + before + [IMAGE_TOKEN_INDEX] + after
    assert tokenizer_image_token("<image>", tokenizer) == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    assert tokenizer_image_token("no image here", tokenizer) == tokenizer("no image here").input_ids
    tensor = tokenizer_image_token("a <image> b", tokenizer, image_token_index=-7, return_tensors="pt")
    assert tensor.dtype == torch.long and (tensor == -7).sum() == 1
    with pytest.raises(ValueError, match="return_tensors"):
        tokenizer_image_token("a", tokenizer, return_tensors="np")


def test_expand2square_pads_short_side_centered():
    square = expand2square(Image.new("RGB", (500, 375), (255, 0, 0)), (1, 2, 3))
    assert square.size == (500, 500)
    assert square.getpixel((0, 61)) == (1, 2, 3) and square.getpixel((0, 62)) == (255, 0, 0)
    assert square.getpixel((499, 436)) == (255, 0, 0) and square.getpixel((499, 437)) == (1, 2, 3)
    tall = expand2square(Image.new("RGB", (3, 7), (9, 9, 9)), (0, 0, 0))
    assert tall.size == (7, 7) and tall.getpixel((1, 0)) == (0, 0, 0) and tall.getpixel((2, 0)) == (9, 9, 9)


def test_pinpoint_sets_and_unsupported_count():
    assert anyres_grid_pinpoints(4, 336) == NEXT_PINPOINTS_336
    nine = anyres_grid_pinpoints(9, 336)
    assert nine[:5] == NEXT_PINPOINTS_336
    assert nine[5:] == [[1008, 672], [672, 1008], [1008, 1008], [672, 1344], [1344, 672]]
    with pytest.raises(ValueError, match="--max_num_sub_images 5"):
        anyres_grid_pinpoints(5, 336)


@pytest.mark.parametrize(
    "size, best",
    [((336, 336), (336, 672)), ((640, 480), (672, 672)), ((900, 600), (672, 672)), ((1920, 1080), (672, 672)),
     ((1008, 336), (1008, 336)), ((336, 1008), (336, 1008)), ((500, 1500), (336, 1008))],
)
def test_select_best_resolution_matches_llava_next(size, best):
    assert select_best_resolution(size, [tuple(p) for p in NEXT_PINPOINTS_336]) == best


def test_grid_shape_accepts_list_or_string_pinpoints():
    assert get_anyres_image_grid_shape((900, 600), NEXT_PINPOINTS_336, 336) == (2, 2)
    assert get_anyres_image_grid_shape((1008, 336), str(NEXT_PINPOINTS_336), 336) == (3, 1)
    assert get_anyres_image_grid_shape((200, 900), anyres_grid_pinpoints(9, 336), 336) == (1, 3)


def test_resize_and_pad_letterboxes_and_tiles_row_major():
    image = Image.new("RGB", (90, 60), (200, 100, 50))
    padded = resize_and_pad_image(image, (56, 56))
    assert padded.size == (56, 56)
    # 90x60 -> 56x38 (ceil of 37.3), pasted at y = (56 - 38) // 2 = 9
    assert padded.getpixel((28, 8)) == (0, 0, 0) and padded.getpixel((28, 9)) == (200, 100, 50)
    assert padded.getpixel((28, 46)) == (200, 100, 50) and padded.getpixel((28, 47)) == (0, 0, 0)
    marks = Image.new("RGB", (4, 4))
    for i, (x, y) in enumerate([(0, 0), (2, 0), (0, 2), (2, 2)]):
        marks.putpixel((x, y), (i + 1, 0, 0))
    assert [t.getpixel((0, 0))[0] for t in divide_to_patches(marks, 2)] == [1, 2, 3, 4]


def test_anyres_tile_counts_and_base_first():
    processor = small_processor(28)
    pinpoints = anyres_grid_pinpoints(4, 28)
    wide = process_anyres_image(gradient_image(90, 30), processor, pinpoints)
    assert wide.shape == (1 + 3, 3, 28, 28)
    square = process_anyres_image(gradient_image(64, 64), processor, pinpoints)
    assert square.shape == (1 + 4, 3, 28, 28)
    base_only = processor(gradient_image(64, 64).resize((28, 28), Image.Resampling.BICUBIC),
                          return_tensors="pt")["pixel_values"][0]
    assert torch.equal(square[0], base_only)


def test_process_images_modes_and_list_for_mixed_shapes():
    processor = small_processor(28)
    images = [gradient_image(40, 20), gradient_image(20, 40)]
    square = process_images(images, processor, SimpleNamespace(image_aspect_ratio="square"))
    assert square.shape == (2, 3, 28, 28)
    pad = process_images([Image.new("RGB", (40, 20), (255, 255, 255))], processor,
                         SimpleNamespace(image_aspect_ratio="pad"))
    mean_colour = (np.array([122, 116, 104], np.float32) / 255 - np.array(CLIP_MEAN, np.float32)) / np.array(
        CLIP_STD, np.float32)
    assert torch.allclose(pad[0, :, 0, 14], torch.from_numpy(mean_colour), atol=1e-6)
    cfg = SimpleNamespace(image_aspect_ratio="anyres_max_4", image_grid_pinpoints=anyres_grid_pinpoints(4, 28))
    mixed = process_images([gradient_image(90, 30), gradient_image(64, 64)], processor, cfg)
    assert isinstance(mixed, list) and [m.shape[0] for m in mixed] == [4, 5]
    same = process_images([gradient_image(64, 64), gradient_image(60, 60)], processor, cfg)
    assert same.shape == (2, 5, 3, 28, 28)


def test_process_images_errors_name_the_flag():
    processor = small_processor(28)
    with pytest.raises(ValueError, match="--max_num_sub_images"):
        process_images([gradient_image(8, 8)], processor, SimpleNamespace(image_aspect_ratio="anyres",
                                                                            image_grid_pinpoints=None))
    with pytest.raises(ValueError, match="--image_aspect_ratio 'crop'"):
        process_images([gradient_image(8, 8)], processor, SimpleNamespace(image_aspect_ratio="crop"))


def decode_fixture_pixels(case):
    """README §3.3: uint8 codes, stacked crops, decoded through the float32 CLIP normalisation table."""
    codes = torch.from_numpy(np.array(Image.open(os.path.join(FIXTURE, f"case_{case}_pixel_codes.png")).convert("RGB")))
    codes = codes.reshape(-1, 336, 336, 3).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None]
    lut = (torch.arange(256, dtype=torch.float32) / 255 - mean) / std
    return lut[torch.arange(3).view(3, 1, 1), codes.long()]


@pytest.mark.parametrize(
    "case, image, cfg",
    [
        ("A", "A_500x375.png", SimpleNamespace(image_aspect_ratio="pad")),
        ("B", "B_900x600.png", SimpleNamespace(image_aspect_ratio="anyres", image_grid_pinpoints=NEXT_PINPOINTS_336)),
    ],
)
def test_reproduces_official_pixel_values_bit_for_bit(case, image, cfg):
    with open(os.path.join(FIXTURE, f"case_{case}.json")) as f:
        meta = json.load(f)
    expected = decode_fixture_pixels(case).reshape(meta["pixel_values_shape"])
    assert hashlib.sha256(expected.numpy().tobytes()).hexdigest() == meta["pixel_values_sha256_float32"]
    processor = load_image_processor(os.path.join(FIXTURE, "tiny_clip"))
    ours = process_images([Image.open(os.path.join(FIXTURE, "images", image))], processor, cfg)
    assert ours.dtype == torch.float32 and list(ours.shape) == meta["pixel_values_shape"]
    assert torch.equal(ours, expected)


@pytest.mark.parametrize(
    "path, name",
    [("liuhaotian/llava-v1.5-7b", "llava-v1.5-7b"), ("/ckpt/pmod-llava/checkpoint-500/", "pmod-llava_checkpoint-500"),
     ("local-model", "local-model")],
)
def test_get_model_name_from_path(path, name):
    assert get_model_name_from_path(path) == name
