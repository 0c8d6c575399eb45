"""Token-selection figures (p-MoD paper, Figs. 5 and 6) from kept-token decisions and image geometry.

Model-agnostic: callers pass, per layer, one boolean per image token (kept or skipped) and the geometry of
the image tokens as `TokenGrid`s, blocks of rows x columns of cells laid over the image in its own pixel
coordinates (a padded square, an AnyRes base image, the unpadded tile map with one row-end token per row).
matplotlib is imported inside the drawing functions, so importing this module costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SKIPPED_SHADE = (0.05, 0.05, 0.05, 0.72)  # RGBA over tokens a layer skips


@dataclass(frozen=True)
class TokenGrid:
    """`rows` x `cols` image tokens covering `box` = (left, top, right, bottom) in image pixels, row-major.

    `row_end_tokens` tokens follow each row in the sequence (AnyRes newline tokens; they have no place on the
    image and are not drawn). `lines` are extra segments ((x0, y0), (x1, y1)) to draw, e.g. tile borders.
    """

    rows: int
    cols: int
    box: tuple[float, float, float, float]
    label: str = "image"
    row_end_tokens: int = 0
    lines: tuple = field(default=())

    @property
    def num_tokens(self) -> int:
        return self.rows * (self.cols + self.row_end_tokens)

    def cell_mask(self, kept: np.ndarray) -> np.ndarray:
        """[rows, cols] kept flags of this grid's tokens (row-end tokens dropped)."""
        return np.asarray(kept, dtype=bool).reshape(self.rows, self.cols + self.row_end_tokens)[:, : self.cols]


def split_by_grid(kept: np.ndarray, grids: Sequence[TokenGrid]) -> list[np.ndarray]:
    """Cut one layer's per-image-token flags into the grids' [rows, cols] masks, checking the token count."""
    kept = np.asarray(kept, dtype=bool)
    expected = sum(grid.num_tokens for grid in grids)
    if kept.shape != (expected,):
        raise ValueError(f"{kept.shape[0] if kept.ndim == 1 else kept.shape} kept flags for grids of "
                         f"{expected} image tokens")
    masks, start = [], 0
    for grid in grids:
        masks.append(grid.cell_mask(kept[start : start + grid.num_tokens]))
        start += grid.num_tokens
    return masks


def overlay_kept_tokens(image, grids: Sequence[TokenGrid], kept: np.ndarray, width: int = 448):
    """The image (scaled to ``width``) with the tokens one layer skips darkened: a PIL image, for live displays."""
    from PIL import Image, ImageDraw

    scale = width / image.size[0]
    base = image.convert("RGBA").resize((width, max(1, round(image.size[1] * scale))))
    shade = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    fill = tuple(int(255 * channel) for channel in SKIPPED_SHADE)
    for grid, mask in zip(grids, split_by_grid(kept, grids)):
        left, top, right, bottom = (coordinate * scale for coordinate in grid.box)
        cell_w, cell_h = (right - left) / grid.cols, (bottom - top) / grid.rows
        for row, col in zip(*np.nonzero(~mask)):
            draw.rectangle((left + col * cell_w, top + row * cell_h, left + (col + 1) * cell_w,
                            top + (row + 1) * cell_h), fill=fill)
    return Image.alpha_composite(base, shade).convert("RGB")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _draw_grid(axis, image, grid: TokenGrid, mask: np.ndarray | None) -> None:
    width, height = image.size
    left, top, right, bottom = grid.box
    axis.imshow(np.asarray(image), extent=(0, width, height, 0))
    if mask is not None:
        shade = np.zeros((grid.rows, grid.cols, 4))
        shade[~mask] = SKIPPED_SHADE
        axis.imshow(shade, extent=(left, right, bottom, top), interpolation="nearest")
    for (x0, y0), (x1, y1) in grid.lines:
        axis.plot([x0, x1], [y0, y1], color="white", linewidth=1.0)
    axis.set_xlim(min(0, left), max(width, right))
    axis.set_ylim(max(height, bottom), min(0, top))
    axis.set_xticks([])
    axis.set_yticks([])


def plot_kept_tokens(image, grids: Sequence[TokenGrid], kept_by_layer: Mapping[int, np.ndarray],
                     out_path: str | Path, title: str | None = None) -> Path:
    """One row per grid: the image, then one panel per layer with the tokens it skips darkened (Fig. 5)."""
    plt = _pyplot()
    layers = sorted(kept_by_layer)
    masks = {layer: split_by_grid(kept_by_layer[layer], grids) for layer in layers}
    columns = 1 + len(layers)
    figure, axes = plt.subplots(len(grids), columns, figsize=(2.2 * columns, 2.3 * len(grids)), squeeze=False)
    for row, grid in enumerate(grids):
        _draw_grid(axes[row][0], image, grid, None)
        axes[row][0].set_title(f"{grid.label}", fontsize=8)
        for column, layer in enumerate(layers, start=1):
            mask = masks[layer][row]
            _draw_grid(axes[row][column], image, grid, mask)
            axes[row][column].set_title(f"layer {layer}: {int(mask.sum())}/{mask.size} kept", fontsize=8)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, out_path, panels=len(grids) * columns)


def plot_keep_map(kept_by_layer: Mapping[int, np.ndarray], out_path: str | Path, title: str | None = None,
                  grids: Sequence[TokenGrid] = ()) -> Path:
    """Layers x image tokens, kept or skipped (Fig. 6); grid boundaries (e.g. base | tiles) as vertical lines."""
    plt = _pyplot()
    layers = sorted(kept_by_layer)
    matrix = np.stack([np.asarray(kept_by_layer[layer], dtype=float) for layer in layers])
    figure, axis = plt.subplots(figsize=(min(14.0, 2.0 + 0.06 * matrix.shape[1]), 1.0 + 0.3 * len(layers)))
    axis.imshow(matrix, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers], fontsize=7)
    axis.set_xlabel("image token (sequence order)", fontsize=8)
    boundary = 0
    for grid in list(grids)[:-1]:
        boundary += grid.num_tokens
        axis.axvline(boundary - 0.5, color="red", linewidth=1.0)
    if title:
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, out_path, panels=1)


def _save(figure, out_path, panels: int) -> Path:
    """Write the PNG; its text chunk `Panels` says how many image panels it holds (for tools and tests)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_path, dpi=110, metadata={"Panels": str(panels)})
    _pyplot().close(figure)
    return out_path
