"""LLaVA-NeXT AnyRes on the real 336-px geometry (24 x 24 tokens per tile): token counts, unpadding, the
newline column, p-MoD target masks and truncation after image expansion.

The vision tower is a 1-layer, hidden-32 CLIP with the real input size, so counts are the real ones and the
tests stay fast.
"""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import anyres_grid_pinpoints, load_image_processor, process_images
from llava.model import LlavaConfig, LlavaLlamaForCausalLM
from llava.model.anyres_merge import merge_anyres_features
from llava.tiny_models import build_tiny_clip
from pmod_testing import tiny_config_kwargs

TILE = 336
SIDE = 24  # tokens per tile side: 336 px / 14 px patches
BASE_TOKENS = SIDE * SIDE
PINPOINTS_4 = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # (w, h), LLaVA-NeXT order

# llava.md section 2.2 (and pmod-official.md section 3.2): image (w, h) -> (grid columns, rows), tokens.
OFFICIAL_COUNTS = [
    ((336, 336), (1, 2), 1176),
    ((640, 480), (2, 2), 2340),
    ((500, 375), (2, 2), 2340),
    ((1024, 768), (2, 2), 2340),
    ((480, 640), (2, 2), 2352),
    ((899, 1024), (2, 2), 2640),
    ((1280, 720), (2, 2), 1948),
    ((1920, 1080), (2, 2), 1948),
    ((800, 1200), (2, 2), 2160),
    ((1008, 336), (3, 1), 2328),
    ((336, 1008), (1, 3), 2376),
    ((500, 1500), (1, 3), 2376),
    ((672, 672), (2, 2), 2928),
    ((1000, 1000), (2, 2), 2928),
    ((2048, 2048), (2, 2), 2928),
]


def expected_grid(size, pinpoints):
    """Independent best-fit: most image pixels shown, then least canvas wasted, first pinpoint on ties."""
    width, height = size
    best, best_key = None, None
    for canvas_w, canvas_h in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        shown = min(int(width * scale) * int(height * scale), width * height)
        key = (shown, shown - canvas_w * canvas_h)
        if best_key is None or key > best_key:
            best, best_key = (canvas_w // TILE, canvas_h // TILE), key
    return best


def expected_unpadded_box(size, grid, side=SIDE):
    """(top, left, rows, cols) of the feature map that shows the image, by exact integer arithmetic."""
    width, height = size
    map_h, map_w = grid[1] * side, grid[0] * side
    if width * map_h > height * map_w:  # wider than the map: rows were letterboxed
        shown = height * map_w // width
        pad = (map_h - shown) // 2
        return pad, 0, map_h - 2 * pad, map_w
    shown = width * map_h // height
    pad = (map_w - shown) // 2
    return 0, pad, map_h, map_w - 2 * pad


def expected_tokens(size, pinpoints=PINPOINTS_4):
    _, _, rows, cols = expected_unpadded_box(size, expected_grid(size, pinpoints))
    return BASE_TOKENS + rows * (cols + 1)


@pytest.fixture(scope="module")
def clip336(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip336") / "clip-336"
    build_tiny_clip(str(path), image_size=TILE, hidden=32, layers=1)
    return str(path)


def next_model(tower, max_num_sub_images=4, token_type="vision_all", **overrides):
    """A 1-layer dense LLaVA-NeXT model (anyres + spatial_unpad) with a distinctive image_newline."""
    config = LlavaConfig(**tiny_config_kwargs(
        tower, 1, mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
        image_grid_pinpoints=anyres_grid_pinpoints(max_num_sub_images, TILE), mod_target_token_type=token_type,
        **overrides,
    ))
    torch.manual_seed(0)
    model = LlavaLlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.get_model().image_newline.copy_(torch.randn(config.hidden_size) + 3.0)
    return model


def solid(size, color=(120, 40, 200)):
    return Image.new("RGB", size, color)


def prepare(model, processor, sizes, prompt=(1, 5, IMAGE_TOKEN_INDEX, 6, 7), token_type=None):
    """One prompt per image, right-padded; returns the prepared inputs."""
    if token_type is not None:
        model.config.mod_target_token_type = token_type
    images = process_images([solid(size) for size in sizes], processor, model.config)
    ids = torch.tensor([list(prompt)] * len(sizes))
    with torch.no_grad():
        return model.prepare_multimodal_inputs(ids, torch.ones_like(ids, dtype=torch.bool), None, images, sizes)


def test_official_pinpoints_are_the_llava_next_set():
    assert [tuple(p) for p in anyres_grid_pinpoints(4, TILE)] == PINPOINTS_4


def test_official_token_count_table(clip336):
    model = next_model(clip336)
    processor = load_image_processor(clip336)
    sizes = [size for size, _, _ in OFFICIAL_COUNTS]
    images = process_images([solid(size) for size in sizes], processor, model.config)
    assert [image.shape[0] - 1 for image in images] == [gw * gh for _, (gw, gh), _ in OFFICIAL_COUNTS]
    prepared = prepare(model, processor, sizes)
    counts = prepared.target_mask.sum(dim=1).tolist()
    assert counts == [tokens for _, _, tokens in OFFICIAL_COUNTS]
    assert list(prepared.counts.n_target) == counts
    assert prepared.attention_mask.sum(dim=1).tolist() == [4 + tokens for tokens in counts]


def test_nine_tile_set_peaks_at_5832_tokens(clip336):
    model = next_model(clip336, max_num_sub_images=9)
    processor = load_image_processor(clip336)
    prepared = prepare(model, processor, [(1008, 1008), (640, 480)])
    nine_tiles = anyres_grid_pinpoints(9, TILE)
    assert prepared.target_mask.sum(dim=1).tolist() == [5832, expected_tokens((640, 480), nine_tiles)]


ODD_SIZES = [(333, 501), (1001, 337), (517, 389), (1234, 567), (99, 1777), (2000, 333), (701, 701), (345, 1000)]


def test_unpadded_counts_of_odd_sizes_match_integer_arithmetic(clip336):
    model = next_model(clip336)
    processor = load_image_processor(clip336)
    prepared = prepare(model, processor, ODD_SIZES)
    assert prepared.target_mask.sum(dim=1).tolist() == [expected_tokens(size) for size in ODD_SIZES]


@pytest.mark.parametrize("size", ODD_SIZES + [(640, 480), (480, 640), (336, 336)])
def test_merge_keeps_exactly_the_image_area_row_major_with_a_newline_per_row(size):
    """Tile features encode their own (row, column) in the full feature map; the merge must return exactly the
    unpadded box, row by row, each row closed by the newline vector, after the untouched base tile."""
    grid = expected_grid(size, PINPOINTS_4)
    grid_w, grid_h = grid
    tiles = torch.zeros(1 + grid_w * grid_h, BASE_TOKENS, 2)
    tiles[0] = torch.stack([torch.full((BASE_TOKENS,), -5.0), torch.arange(BASE_TOKENS, dtype=torch.float)], dim=1)
    for tile in range(grid_w * grid_h):
        tile_row, tile_col = divmod(tile, grid_w)
        for patch in range(BASE_TOKENS):
            patch_row, patch_col = divmod(patch, SIDE)
            tiles[1 + tile, patch] = torch.tensor([tile_row * SIDE + patch_row, tile_col * SIDE + patch_col])
    newline = torch.tensor([-1.0, -1.0])
    merged, base_tokens = merge_anyres_features(tiles, size, PINPOINTS_4, TILE, newline)
    top, left, rows, cols = expected_unpadded_box(size, grid)
    expected = [tiles[0]]
    for row in range(top, top + rows):
        coords = torch.tensor([[row, col] for col in range(left, left + cols)], dtype=torch.float)
        expected += [coords, newline[None]]
    assert base_tokens == BASE_TOKENS
    torch.testing.assert_close(merged, torch.cat(expected), atol=0, rtol=0)


def test_newline_embedding_closes_every_row(clip336):
    model = next_model(clip336)
    processor = load_image_processor(clip336)
    sizes = [(640, 480), (333, 501)]
    prepared = prepare(model, processor, sizes)
    newline = model.get_model().image_newline
    for row, size in enumerate(sizes):
        _, _, rows, cols = expected_unpadded_box(size, expected_grid(size, PINPOINTS_4))
        embeds = prepared.inputs_embeds[row]
        is_newline = (embeds == newline).all(dim=-1)
        start = 2 + BASE_TOKENS  # BOS, one text token, then the base tile
        expected = [start + r * (cols + 1) + cols for r in range(rows)]
        assert torch.nonzero(is_newline).flatten().tolist() == expected


@pytest.mark.parametrize(
    "token_type, text, base, high_res",
    [("vision_all", False, True, True), ("vision_hr", False, False, True), ("all", True, True, True)],
)
def test_target_mask_per_token_type(clip336, token_type, text, base, high_res):
    model = next_model(clip336)
    processor = load_image_processor(clip336)
    size = (640, 480)
    prepared = prepare(model, processor, [size], token_type=token_type)
    mask = prepared.target_mask[0]
    vision = expected_tokens(size)
    assert mask.shape[0] == 4 + vision
    assert mask[:2].tolist() == [text, text] and mask[-2:].tolist() == [text, text]
    assert mask[2 : 2 + BASE_TOKENS].eq(base).all()
    assert mask[2 + BASE_TOKENS : 2 + vision].eq(high_res).all()  # newline tokens included
    assert prepared.counts.n_target[0] == int(mask.sum())


def test_text_only_sample_targets_nothing_but_text_under_all(clip336):
    model = next_model(clip336)
    processor = load_image_processor(clip336)
    images = [process_images([solid((640, 480))], processor, model.config)[0], torch.zeros(3, TILE, TILE)]
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6], [1, 8, 9, 10]])
    for token_type, expected in (("vision_all", [2340, 0]), ("all", [2343, 4])):
        model.config.mod_target_token_type = token_type
        with torch.no_grad():
            prepared = model.prepare_multimodal_inputs(ids, None, None, images, [(640, 480), None])
        assert list(prepared.counts.n_target) == expected
        assert list(prepared.counts.n_valid) == [2343, 4]


def test_truncation_cuts_mask_labels_and_embeddings_at_the_same_place(clip336, caplog):
    """A sample cut inside its high-res tokens keeps embeddings, labels and p-MoD targets aligned."""
    model = next_model(clip336)
    processor = load_image_processor(clip336)
    sizes = [(640, 480), (336, 336)]
    images = process_images([solid(size) for size in sizes], processor, model.config)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7, 8], [1, IMAGE_TOKEN_INDEX, 9, 0, 0, 0]])
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    labels = torch.where(mask & (ids != IMAGE_TOKEN_INDEX), ids, IGNORE_INDEX)
    with torch.no_grad():
        full = model.prepare_multimodal_inputs(ids, mask, labels, images, sizes)
        limit = 2 + BASE_TOKENS + 700  # inside the first sample's high-res rows
        assert full.attention_mask[1].sum() < limit < full.attention_mask[0].sum()
        model.config.tokenizer_model_max_length = limit
        before = LlavaLlamaForCausalLM.truncated_samples
        with caplog.at_level(logging.WARNING, logger="llava.model.llava_arch"):
            cut = model.prepare_multimodal_inputs(ids, mask, labels, images, sizes)
    assert cut.inputs_embeds.shape[1] == limit
    torch.testing.assert_close(cut.inputs_embeds[0], full.inputs_embeds[0, :limit], atol=0, rtol=0)
    assert torch.equal(cut.target_mask[0], full.target_mask[0, :limit])
    assert torch.equal(cut.labels[0], full.labels[0, :limit])
    assert cut.counts.n_target[0] == limit - 2 and cut.counts.n_valid[0] == limit
    short = int(full.attention_mask[1].sum())
    assert torch.equal(cut.target_mask[1, :short], full.target_mask[1, :short])
    assert torch.equal(cut.labels[1, :short], full.labels[1, :short])
    assert cut.counts.n_target[1] == full.counts.n_target[1] == 1176
    assert LlavaLlamaForCausalLM.truncated_samples == before + 1
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert f"Truncated 1 sample(s) of this batch (rows [0]) to tokenizer_model_max_length={limit}" in warning
    assert f"{before + 1} truncated so far" in warning


@pytest.mark.parametrize("size, official, exact", [((396, 704), 1872, 1968), ((1407, 536), 2088, 2136)])
def test_unpad_keeps_llava_float_rounding_where_exact_arithmetic_differs(size, official, exact):
    """LLaVA-1.6 computes int(396 * (48 / 704)) = int(26.999...) = 26 columns, not 27; checkpoints were trained
    with that layout, so the model keeps it (exact integer arithmetic would give two more columns)."""
    grid = expected_grid(size, PINPOINTS_4)
    tiles = torch.zeros(1 + grid[0] * grid[1], BASE_TOKENS, 2)
    merged, _ = merge_anyres_features(tiles, size, PINPOINTS_4, TILE, torch.ones(2))
    assert (merged.shape[0], expected_tokens(size)) == (official, exact)
