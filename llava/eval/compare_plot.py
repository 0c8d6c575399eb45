"""The comparison's figure: mean accuracy against TFLOPs relative to dense, one colour per method family.

Drawn with Pillow (always installed) so that the comparison needs no plotting extra.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 900, 600, 80
RIGHT_MARGIN = 200  # room for the labels of the points at the right edge (dense sits at 1.0)
COLOURS = {"dense": (0, 0, 0), "fastv": (31, 119, 180), "pdrop": (255, 127, 14), "visionzip": (148, 103, 189),
           "random": (127, 127, 127), "uniform": (44, 160, 44), "p-MoD": (214, 39, 40)}


def family(name: str) -> str:
    return "p-MoD" if name.startswith("p-MoD") else name.split("_")[0]


def plot_accuracy_vs_tflops(runs, path: Path) -> Path:
    """Write ``path`` (PNG); runs without a score or TFLOPs ratio are left out of the figure."""
    points = [(run.tflops_ratio, run.mean_score, run.name) for run in runs
              if run.tflops_ratio is not None and run.mean_score is not None]
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, MARGIN // 2, WIDTH - RIGHT_MARGIN, HEIGHT - MARGIN
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((WIDTH // 2 - 110, HEIGHT - 30), "LLM prefill TFLOPs / dense", fill=(0, 0, 0))
    draw.text((8, top - 16), "mean accuracy", fill=(0, 0, 0))
    if points:
        scores = [score for _, score, _ in points]
        low, high = min(scores), max(scores)
        pad = 0.05 if high - low < 1e-9 else 0.1 * (high - low)
        low, high = low - pad, high + pad

        def to_pixel(x, y):
            return left + x * (right - left), bottom - (y - low) / (high - low) * (bottom - top)

        for tick in range(6):
            x = tick / 5
            px, _ = to_pixel(x, low)
            draw.line([px, bottom, px, bottom + 5], fill=(0, 0, 0))
            draw.text((px - 8, bottom + 8), f"{x:.1f}", fill=(0, 0, 0))
            y = low + tick * (high - low) / 5
            _, py = to_pixel(0, y)
            draw.line([left - 5, py, left, py], fill=(0, 0, 0))
            draw.text((8, py - 6), f"{y:.3g}", fill=(0, 0, 0))
        for x, y, name in points:
            px, py = to_pixel(x, y)
            colour = COLOURS.get(family(name), (140, 86, 75))
            draw.ellipse([px - 5, py - 5, px + 5, py + 5], fill=colour)
            draw.text((px + 7, py - 7), name, fill=colour)
    image.save(path)
    return path
