"""scripts/data: LLaVA-NeXT-Data parquet -> JSON + image folder, and the official clean-up with its padding fixed.

The parquet file is made up here in the hub dataset's record format (id, conversations, data_source, and an
embedded image struct {bytes, path} that may be null)."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, run_command, subprocess_env
from PIL import Image

from llava.mm_utils import anyres_grid_pinpoints, load_image_processor
from llava.train.dataset import LazySupervisedDataset

DATA_TOOLS = REPO_ROOT / "scripts" / "data"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"next_data_{name}", DATA_TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


clean = load_tool("clean_llava_json")


def png_bytes(size, mode="RGB", color=(200, 30, 30)):
    buffer = io.BytesIO()
    image = Image.new(mode, size, color if mode == "RGB" else 3 if mode == "P" else color + (128,))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(size):
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 30, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


HUB_ROWS = [
    dict(id="coco/train2017/000000123", data_source="coco", image=png_bytes((64, 48), "RGBA"),
         conversations=turns("<image>\nWhat color is it?", "ASSISTANT: It is red.", "Sure?", "Yes.")),
    dict(id="sharegpt4v/sam/abc", data_source="sharegpt4v", image=jpeg_bytes((40, 90)),
         conversations=turns("Describe it.\n<image>", "A blue picture.")),
    dict(id="text/0001", data_source="sharegpt", image=None,
         conversations=turns("Name a color.", "Red. ASSISTANT: green.")),
    dict(id="coco-train2017-000000123", data_source="coco", image=png_bytes((30, 30), "P"),
         conversations=turns("What is shown?", "A picture.")),
]


def write_hub_parquet(path):
    """Two files, as the hub splits the data; the image column is HF's struct<bytes, path>."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([
        ("id", pa.string()),
        ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
        ("data_source", pa.string()),
        ("image", image_type),
    ])
    path.mkdir()
    for part, rows in enumerate((HUB_ROWS[:2], HUB_ROWS[2:])):
        columns = {name: [row[name] for row in rows] for name in ("id", "conversations", "data_source")}
        columns["image"] = [None if row["image"] is None else {"bytes": row["image"], "path": None} for row in rows]
        pq.write_table(pa.table(columns, schema=schema), path / f"train-{part:05d}-of-00002.parquet")


def test_prepare_converts_hub_parquet_into_a_dataset_we_train_on(tmp_path, tiny_models):
    write_hub_parquet(tmp_path / "hub")
    output_json, image_folder = tmp_path / "out" / "llava_next_data.json", tmp_path / "out" / "images"
    run_command([sys.executable, DATA_TOOLS / "prepare_llava_next_data.py", "--parquet", tmp_path / "hub",
                 "--output-json", output_json, "--image-folder", image_folder], env=subprocess_env())

    records = json.loads(output_json.read_text())
    assert [r["id"] for r in records] == [row["id"] for row in HUB_ROWS]
    assert [r.get("image") for r in records] == [
        "coco-train2017-000000123.png", "sharegpt4v-sam-abc.jpg", None, "coco-train2017-000000123-1.png",
    ]
    assert "image" not in records[2]
    for record, row in zip(records, HUB_ROWS):
        if row["image"] is not None:
            assert (image_folder / record["image"]).read_bytes() == row["image"]  # lossless by default
    assert records[0]["conversations"][1]["value"] == "It is red."
    assert records[2]["conversations"][1]["value"] == "Red. green."
    assert records[3]["conversations"][0]["value"] == "<image>\nWhat is shown?"
    assert records[1]["data_source"] == "sharegpt4v"

    processor = load_image_processor(tiny_models.vision_tower)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models.llm)
    data_args = SimpleNamespace(
        image_folder=str(image_folder), image_aspect_ratio="anyres", image_processor=processor, is_multimodal=True,
        version="v1", image_grid_pinpoints=anyres_grid_pinpoints(4, 56),
    )
    dataset = LazySupervisedDataset(str(output_json), tokenizer, data_args)
    samples = [dataset[i] for i in range(len(dataset))]
    tiles = (3, 3, 56, 56)  # base + 2 tiles: these sizes pick the 2x1, 1x2 and (tie) 1x2 grids
    assert [tuple(s["image"].shape) for s in samples] == [tiles, tiles, (3, 56, 56), tiles]
    assert [s["image_size"] for s in samples] == [(64, 48), (40, 90), None, (30, 30)]
    assert dataset.modality_lengths[2] < 0 < dataset.modality_lengths[0]
    assert all((s["labels"] != -100).any() for s in samples)


def test_prepare_jpeg_mode_matches_the_official_layout(tmp_path):
    write_hub_parquet(tmp_path / "hub")
    output_json, image_folder = tmp_path / "data.json", tmp_path / "images"
    run_command([sys.executable, DATA_TOOLS / "prepare_llava_next_data.py", "--parquet",
                 *sorted((tmp_path / "hub").glob("*.parquet")), "--output-json", output_json,
                 "--image-folder", image_folder, "--jpeg"], env=subprocess_env())
    records = json.loads(output_json.read_text())
    names = [r["image"] for r in records if "image" in r]
    assert names == ["coco-train2017-000000123.jpg", "sharegpt4v-sam-abc.jpg", "coco-train2017-000000123-1.jpg"]
    for name, size in zip(names, [(64, 48), (40, 90), (30, 30)]):
        with Image.open(image_folder / name) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", size)


def test_prepare_names_the_file_and_row_of_a_broken_image(tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    table = pa.table({"id": ["good", "bad/one"], "conversations": [turns("hi", "ho")] * 2,
                      "image": [None, {"bytes": b"not an image", "path": None}]})
    pq.write_table(table, hub / "part.parquet")
    result = run_command([sys.executable, DATA_TOOLS / "prepare_llava_next_data.py", "--parquet", hub,
                          "--output-json", tmp_path / "x.json", "--image-folder", tmp_path / "im"],
                         env=subprocess_env(), expect_success=False)
    assert result.returncode == 2
    assert "part.parquet: row 1 (id 'bad/one')" in result.stderr


def test_missing_parquet_input_is_named(tmp_path):
    result = run_command([sys.executable, DATA_TOOLS / "prepare_llava_next_data.py", "--parquet", tmp_path / "nope",
                          "--output-json", tmp_path / "x.json", "--image-folder", tmp_path / "im"],
                         env=subprocess_env(), expect_success=False)
    assert result.returncode == 2 and "--parquet" in result.stderr and "nope" in result.stderr
    assert not (tmp_path / "im").exists()


def llava_records(n_image, n_text):
    image = [{"id": f"i{k}", "image": f"{k}.jpg", "conversations": turns("<image>\nQ", "A")} for k in range(n_image)]
    text = [{"id": f"t{k}", "conversations": turns("Q", "A")} for k in range(n_text)]
    return image + text


@pytest.mark.parametrize("count, expected", [(0, 0), (1, 127), (127, 1), (128, 0), (256, 0), (300, 84)])
def test_duplicates_needed_is_zero_for_an_exact_multiple(count, expected):
    assert clean.duplicates_needed(count, 128) == expected


def test_padding_makes_each_modality_a_multiple_and_is_seeded():
    records = llava_records(256, 3)
    padded = clean.pad_modalities(records, 128, seed=42)
    images = [r for r in padded if "image" in r]
    texts = [r for r in padded if "image" not in r]
    assert len(images) == 256 and len(texts) == 128  # the official script would have added 128 image duplicates
    assert padded[:259] == records and {r["id"] for r in texts} == {"t0", "t1", "t2"}
    assert clean.pad_modalities(records, 128, seed=42) == padded
    assert clean.pad_modalities(records, 128, seed=7) != padded


def test_clean_cli_strips_inner_role_tags_and_does_not_duplicate_by_default(tmp_path):
    records = llava_records(2, 1)
    records[0]["conversations"][1]["value"] = "ASSISTANT: The answer."
    records[2]["conversations"][0]["value"] = "Quote: USER: hi ASSISTANT: hello"
    source, target = tmp_path / "in.json", tmp_path / "out.json"
    source.write_text(json.dumps(records))
    clean.main([str(source), str(target)])
    cleaned = json.loads(target.read_text())
    assert len(cleaned) == 3
    assert cleaned[0]["conversations"][1]["value"] == "The answer."
    assert cleaned[2]["conversations"][0]["value"] == "Quote: USER: hi hello"
    clean.main([str(source), str(target), "--pad-to-multiple", "4"])
    assert len(json.loads(target.read_text())) == 8
