"""LLaVA-NeXT 'spatial_unpad' merge: tile features back into one map, letterbox rows/columns cut away,
a learned newline vector after every row. The base (thumbnail) tile's features come first."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from llava.mm_utils import get_anyres_image_grid_shape

# LLaVA-NeXT's threshold for shrinking an unpadded map under image_aspect_ratio anyres_max_N.
ANYRES_MAX_TOLERANCE = 1.1


def unpad_image(feature_map: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """Crop a [C, H, W] map to the part that shows the original (w, h) image (LLaVA-1.6 integer arithmetic)."""
    width, height = original_size
    _, map_height, map_width = feature_map.shape
    if width / height > map_width / map_height:
        shown = int(height * (map_width / width))
        pad = (map_height - shown) // 2
        return feature_map[:, pad : map_height - pad, :]
    shown = int(width * (map_height / height))
    pad = (map_width - shown) // 2
    return feature_map[:, :, pad : map_width - pad]


def shrink_to_budget(feature_map: torch.Tensor, max_tiles: int, tokens_per_tile: int) -> torch.Tensor:
    """anyres_max_N: resize a map holding more than ~N tiles' worth of tokens down to about N tiles."""
    _, height, width = feature_map.shape
    factor = math.sqrt(height * width / (max_tiles * tokens_per_tile))
    if factor <= ANYRES_MAX_TOLERANCE:
        return feature_map
    size = (int(height // factor), int(width // factor))
    return F.interpolate(feature_map[None], size=size, mode="bilinear")[0]


def merge_anyres_features(
    tile_features: torch.Tensor,
    image_size: tuple[int, int],
    grid_pinpoints,
    tile_size: int,
    newline: torch.Tensor | None,
    unpad: bool = True,
    max_tiles: int | None = None,
) -> tuple[torch.Tensor, int]:
    """[1 + P, T, D] features of one image -> ([N, D] merged sequence, number of base-tile tokens)."""
    base = tile_features[0]
    if tile_features.shape[0] == 1:
        merged = base if newline is None else torch.cat([base, newline[None].to(base.dtype)], dim=0)
        return merged, base.shape[0]
    tokens_per_tile, dim = base.shape
    side = math.isqrt(tokens_per_tile)
    grid_w, grid_h = get_anyres_image_grid_shape(tuple(image_size), grid_pinpoints, tile_size)
    tiles = tile_features[1:]
    if tiles.shape[0] != grid_w * grid_h:
        raise ValueError(
            f"image of size {tuple(image_size)} has {tiles.shape[0]} tiles but its anyres grid is {grid_w}x{grid_h}"
        )
    feature_map = tiles.view(grid_h, grid_w, side, side, dim).permute(4, 0, 2, 1, 3).reshape(dim, grid_h * side, grid_w * side)
    if unpad:
        feature_map = unpad_image(feature_map, image_size)
    if max_tiles is not None:
        feature_map = shrink_to_budget(feature_map, max_tiles, tokens_per_tile)
    if newline is not None:
        rows = feature_map.shape[1]
        column = newline.to(feature_map.dtype)[:, None, None].expand(dim, rows, 1)
        feature_map = torch.cat([feature_map, column], dim=2)
    high_res = feature_map.flatten(1).transpose(0, 1)
    return torch.cat([base, high_res], dim=0), base.shape[0]
