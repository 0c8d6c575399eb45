"""The demo's synthetic data: deterministic by seed, LLaVA-format, and every answer true of its image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from llava.demo.lmms_task import process_results, write_task
from llava.demo.synthetic import (
    COLORS,
    NUMBER_WORDS,
    QUESTION_TYPES,
    answer_is_correct,
    write_dataset,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), num_train=40, num_eval=12, image_size=56, seed=3)


def _expected_answer(scene: dict, question: str) -> str:
    """The answer recomputed from the scene description alone (independent of the generator's code)."""
    shapes = scene["shapes"]
    if question.startswith("What color is the "):
        kind = question.removeprefix("What color is the ").rstrip("?")
        return next(s["color"] for s in shapes if s["kind"] == kind)
    if question.startswith("What shape is at the "):
        position = question.removeprefix("What shape is at the ").rstrip("?")
        return next(s["kind"] for s in shapes if s["position"] == position)
    if question == "How many shapes are there?":
        return NUMBER_WORDS[len(shapes)]
    color, kind = question.removeprefix("Is there a ").rstrip("?").split()
    return "yes" if any(s["color"] == color and s["kind"] == kind for s in shapes) else "no"


def test_same_seed_same_files_other_seed_other_data(dataset, tmp_path):
    again = write_dataset(tmp_path / "again", num_train=40, num_eval=12, image_size=56, seed=3)
    for name in ("pretrain_json", "instruct_json", "eval_json", "scenes_json"):
        assert Path(getattr(again, name)).read_text() == Path(getattr(dataset, name)).read_text()
    first = Path(dataset.image_folder) / "train_00007.png"
    assert (Path(again.image_folder) / "train_00007.png").read_bytes() == first.read_bytes()
    other = write_dataset(tmp_path / "other", num_train=40, num_eval=12, image_size=56, seed=4)
    assert Path(other.scenes_json).read_text() != Path(dataset.scenes_json).read_text()


def test_every_answer_follows_from_the_scene(dataset):
    scenes = json.loads(Path(dataset.scenes_json).read_text())
    instruct = json.loads(Path(dataset.instruct_json).read_text())
    assert len(instruct) == 40
    checked = 0
    for sample in instruct + json.loads(Path(dataset.eval_json).read_text()):
        turns = sample["conversations"]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
        assert sum("<image>" in turn["value"] for turn in turns) == 1
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            assert gpt["value"] == _expected_answer(scenes[sample["image"]], question), (sample["id"], question)
            checked += 1
    assert checked == 40 * len(QUESTION_TYPES) + 12


def test_images_show_the_described_shapes(dataset):
    scenes = json.loads(Path(dataset.scenes_json).read_text())
    for name, scene in list(scenes.items())[:15]:
        image = Image.open(Path(dataset.image_folder) / name).convert("RGB")
        assert image.size == (56, 56)
        for shape in scene["shapes"]:
            assert image.getpixel(tuple(shape["center"])) == COLORS[shape["color"]], (name, shape)
        assert image.getpixel((0, 0)) == tuple(scene["background"])


def test_captions_and_held_out_questions(dataset):
    scenes = json.loads(Path(dataset.scenes_json).read_text())
    for sample in json.loads(Path(dataset.pretrain_json).read_text()):
        caption = sample["conversations"][1]["value"]
        for shape in scenes[sample["image"]]["shapes"]:
            assert f"a {shape['color']} {shape['kind']} at the {shape['position']}" in caption
    held_out = json.loads(Path(dataset.eval_json).read_text())
    train_images = {s["image"] for s in json.loads(Path(dataset.instruct_json).read_text())}
    assert not train_images & {s["image"] for s in held_out}
    assert [s["question_type"] for s in held_out] == list(QUESTION_TYPES) * 3
    presence = [s["answer"] for s in json.loads(Path(dataset.eval_json).read_text()) if s["question_type"] == "presence"]
    assert set(presence) <= {"yes", "no"}


def test_answer_matching_and_lmms_task_files(dataset, tmp_path):
    assert answer_is_correct("Red.", "red") and answer_is_correct(" yes, it is", "yes")
    assert not answer_is_correct("", "red") and not answer_is_correct("the red one", "red")
    folder = write_task(tmp_path / "task", dataset.eval_json, dataset.image_folder)
    rows = [json.loads(line) for line in (folder / "pmod_demo_shapes.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(Path(row["image_path"]).is_file() for row in rows)
    assert "dataset_path: json" in (folder / "pmod_demo_shapes.yaml").read_text()
    assert process_results(rows[0], [rows[0]["answer"].upper()]) == {"exact_match": 1.0}
    assert process_results(rows[0], ["banana"]) == {"exact_match": 0.0}


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        write_dataset(tmp_path, num_train=0, num_eval=1)
    with pytest.raises(ValueError, match="image_size"):
        write_dataset(tmp_path, num_train=1, num_eval=1, image_size=20)
