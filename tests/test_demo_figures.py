"""Token-selection figures: the kept tokens equal the model's own selection, geometry, PNG panels, the CLI."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import run_command
from PIL import Image

from llava.demo.figures import image_token_grids, load_model, token_selection_figures
from llava.eval.tiny_checkpoint import build_tiny_llava_checkpoint
from pmod.visualize import TokenGrid, split_by_grid


@pytest.fixture(scope="module")
def checkpoints(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("figure-ckpts")
    return {kind: build_tiny_llava_checkpoint(tiny_models, str(root / kind), pmod=kind != "dense",
                                              image_aspect_ratio="anyres" if kind == "anyres" else "pad")
            for kind in ("pad", "anyres", "dense")}


def _image(size=(84, 42)):
    image = Image.new("RGB", size, (235, 235, 235))
    image.paste((30, 60, 220), (4, 4, 30, 30))
    return image


def _panels(path) -> int:
    with Image.open(path) as png:
        assert png.size[0] > 100 and png.size[1] > 100
        return int(png.text["Panels"])


@pytest.mark.parametrize("kind", ["pad", "anyres"])
def test_kept_tokens_match_the_model_schedule_and_panels(checkpoints, kind, tmp_path):
    tokenizer, model, image_processor = load_model(checkpoints[kind])
    image = _image()
    paths = token_selection_figures(model, tokenizer, image_processor, image, "What color is it?", tmp_path, "x")
    assert [p.name for p in paths] == ["x_kept_tokens.png", "x_keep_map.png"]
    schedule = model.get_model().schedule
    stats = model.get_model().last_routing_stats
    n_vision = stats.n_vision[0]
    grids = image_token_grids(model, image.size)
    assert sum(grid.num_tokens for grid in grids) == n_vision
    assert _panels(paths[0]) == len(grids) * (1 + len(schedule.mod_layers))
    assert _panels(paths[1]) == 1
    if kind == "anyres":
        base, tiles = grids
        assert base.box == (0, 0, 84, 42) and tiles.row_end_tokens == 1
        left, top, right, bottom = tiles.box  # the unpadded band lies on the image, centred
        assert left == pytest.approx(0, abs=1e-6) and right == pytest.approx(84)
        assert top == pytest.approx(42 - bottom, abs=1e-6)


def test_recomputed_selection_keeps_the_scheduled_counts(checkpoints):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.demo.figures import record_kept_image_tokens
    from llava.eval.prompting import build_prompt
    from llava.mm_utils import process_images, tokenizer_image_token

    tokenizer, model, image_processor = load_model(checkpoints["pad"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for layer in model.get_model().layers:
            if hasattr(layer, "router"):  # random router weights, so the choice depends on the tokens
                layer.router.router.weight.data.normal_()
    image = _image((56, 56))
    ids = tokenizer_image_token(build_prompt("Q?", 1, "vicuna_v1"), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    images = process_images([image], image_processor, model.config)
    kept = record_kept_image_tokens(model, ids[None], images, [image.size])
    schedule = model.get_model().schedule
    n_vision = model.get_model().last_routing_stats.n_vision[0]
    assert [int(kept[layer].sum()) for layer in sorted(kept)] == schedule.keep_counts(n_vision)
    assert all(kept[layer].all() for layer in range(len(kept)) if layer not in schedule.mod_layers)


def test_a_dense_checkpoint_is_refused(checkpoints, tmp_path):
    tokenizer, model, image_processor = load_model(checkpoints["dense"])
    with pytest.raises(ValueError, match="no p-MoD layers"):
        token_selection_figures(model, tokenizer, image_processor, _image(), "Q?", tmp_path)


def test_split_by_grid_drops_row_end_tokens_and_checks_counts():
    grids = [TokenGrid(2, 2, (0, 0, 4, 4)), TokenGrid(2, 3, (0, 0, 6, 4), row_end_tokens=1)]
    kept = np.array([1, 0, 0, 1] + [1, 1, 0, 1] + [0, 0, 1, 0], dtype=bool)
    base, tiles = split_by_grid(kept, grids)
    assert base.tolist() == [[True, False], [False, True]]
    assert tiles.tolist() == [[True, True, False], [False, False, True]]
    with pytest.raises(ValueError, match="12 image tokens"):
        split_by_grid(kept[:-1], grids)


def test_figures_cli_writes_pngs(checkpoints, tmp_path):
    image_file = tmp_path / "scene.png"
    _image().save(image_file)
    result = run_command([sys.executable, "-m", "llava.demo.figures", "--model-path", checkpoints["pad"],
                          "--image-file", image_file, "--query", "What color is the square?",
                          "--out", tmp_path / "figs", "--layers", "1,3"])
    paths = result.stdout.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["scene_kept_tokens.png", "scene_keep_map.png"]
    assert _panels(paths[0]) == 1 + 2
    bad = run_command([sys.executable, "-m", "llava.demo.figures", "--model-path", checkpoints["pad"],
                       "--image-file", tmp_path / "none.png", "--query", "Q", "--out", tmp_path], expect_success=False)
    assert bad.returncode == 2 and "--image-file" in bad.stderr
