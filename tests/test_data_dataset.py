"""LLaVA JSON dataset and collator: samples, mixed batches, and errors that name the sample and file."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.mm_utils import anyres_grid_pinpoints
from llava.tiny_models import CLIP_MEAN, CLIP_STD, build_tiny_tokenizer
from llava.train.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset, make_supervised_data_module

SIDE = 28


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


def data_args(folder, aspect="pad", version="vicuna_v1", data_path=None):
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
        image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3,
    )
    return SimpleNamespace(
        data_path=data_path, image_folder=str(folder), image_aspect_ratio=aspect, image_processor=processor,
        is_multimodal=True, version=version,
        image_grid_pinpoints=anyres_grid_pinpoints(4, SIDE) if aspect.startswith("anyres") else None,
    )


def image_record(i, name, question="<image>\nWhat is this?", answer="A red circle."):
    return {"id": f"img-{i}", "image": name,
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def text_record(i):
    return {"id": f"txt-{i}", "conversations": [{"from": "human", "value": "Count to three."},
                                                 {"from": "gpt", "value": "one two three"}]}


@pytest.fixture()
def folder(tmp_path):
    Image.new("RGB", (60, 40), (255, 0, 0)).save(tmp_path / "wide.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(tmp_path / "square.png")
    return tmp_path


def write_json(path, records):
    path.write_text(json.dumps(records))
    return str(path)


def test_image_and_text_samples(folder, tokenizer):
    path = write_json(folder / "data.json", [image_record(0, "wide.png"), text_record(1)])
    dataset = LazySupervisedDataset(path, tokenizer, data_args(folder))
    assert len(dataset) == 2
    image_sample, text_sample = dataset[0], dataset[1]
    assert image_sample["image"].shape == (3, SIDE, SIDE) and image_sample["image_size"] == (60, 40)
    assert (image_sample["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
    assert (image_sample["labels"] != IGNORE_INDEX).any()
    assert torch.equal(text_sample["image"], torch.zeros(3, SIDE, SIDE)) and text_sample["image_size"] is None
    assert IMAGE_TOKEN_INDEX not in text_sample["input_ids"].tolist()
    assert dataset.modality_lengths == [7, -6]  # whitespace-separated words, "<image>" counted as one
    assert dataset.lengths == [7 + 128, 6]


def test_anyres_sample_has_base_plus_tiles_and_jsonl_is_read(folder, tokenizer):
    Image.new("RGB", (90, 30), (0, 255, 0)).save(folder / "strip.png")
    lines = [json.dumps(image_record(0, "strip.png")), "", json.dumps(image_record(1, "square.png"))]
    (folder / "data.jsonl").write_text("\n".join(lines))
    dataset = LazySupervisedDataset(str(folder / "data.jsonl"), tokenizer, data_args(folder, "anyres"))
    assert dataset[0]["image"].shape == (1 + 3, 3, SIDE, SIDE)  # 3x1 grid
    assert dataset[1]["image"].shape == (1 + 4, 3, SIDE, SIDE)  # 2x2 grid
    assert dataset[0]["image_size"] == (90, 30)


def test_collator_pads_right_and_keeps_mixed_batches(folder, tokenizer):
    path = write_json(folder / "data.json", [image_record(0, "wide.png", answer="A very long answer about shapes."),
                                            text_record(1)])
    dataset = LazySupervisedDataset(path, tokenizer, data_args(folder))
    collator = DataCollatorForSupervisedDataset(tokenizer=tokenizer)
    batch = collator([dataset[0], dataset[1]])
    lengths = [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]
    assert batch["input_ids"].shape == (2, max(lengths))
    short = min(range(2), key=lambda r: lengths[r])
    assert (batch["input_ids"][short, lengths[short]:] == tokenizer.pad_token_id).all()
    assert (batch["labels"][short, lengths[short]:] == IGNORE_INDEX).all()
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["images"].shape == (2, 3, SIDE, SIDE)
    assert batch["image_sizes"] == [(60, 40), None]


def test_collator_returns_image_list_for_mixed_shapes_and_keeps_unk(tokenizer):
    collator = DataCollatorForSupervisedDataset(tokenizer=tokenizer)
    unk = tokenizer.unk_token_id
    instances = [
        dict(input_ids=torch.tensor([1, unk, 5]), labels=torch.tensor([-100, unk, 5]),
             image=torch.zeros(3, 3, 8, 8), image_size=(16, 8)),
        dict(input_ids=torch.tensor([1, 7]), labels=torch.tensor([-100, 7]), image=torch.zeros(3, 8, 8),
             image_size=None),
    ]
    batch = collator(instances)
    assert isinstance(batch["images"], list) and [i.dim() for i in batch["images"]] == [4, 3]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["image_sizes"] == [(16, 8), None]


def test_text_only_collation_has_no_images(tokenizer):
    collator = DataCollatorForSupervisedDataset(tokenizer=tokenizer)
    batch = collator([dict(input_ids=torch.tensor([1, 7]), labels=torch.tensor([-100, 7]))])
    assert set(batch) == {"input_ids", "labels", "attention_mask"}


def test_make_supervised_data_module(folder, tokenizer):
    path = write_json(folder / "data.json", [image_record(0, "wide.png")])
    module = make_supervised_data_module(tokenizer, data_args(folder, data_path=path))
    assert len(module["train_dataset"]) == 1 and module["eval_dataset"] is None
    assert isinstance(module["data_collator"], DataCollatorForSupervisedDataset)


def test_missing_image_names_index_id_and_path(folder, tokenizer):
    path = write_json(folder / "data.json", [text_record(0), image_record(1, "sub/missing.png")])
    dataset = LazySupervisedDataset(path, tokenizer, data_args(folder))
    with pytest.raises(FileNotFoundError, match=r"sample 1 \(id 'img-1'\).*" + str(folder / "sub" / "missing.png")):
        dataset[1]


def test_unreadable_image_names_index_id_and_path(folder, tokenizer):
    (folder / "broken.png").write_bytes(b"this is not a png at all")
    path = write_json(folder / "data.json", [image_record(0, "broken.png")])
    dataset = LazySupervisedDataset(path, tokenizer, data_args(folder))
    with pytest.raises(ValueError, match=r"sample 0 \(id 'img-0'\): cannot read image .*broken\.png"):
        dataset[0]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"id": "x"}, r"data\.json must hold a JSON list"),
        ([text_record(0), {"id": "nc"}], r"data\.json: sample 1 \(id 'nc'\) has no 'conversations'"),
        ([{"id": "q", "conversations": [{"from": "human", "value": "hi"}]}],
         r"sample 0 \(id 'q'\).*no gpt reply"),
        ([text_record(0), text_record(1), image_record(2, "wide.png", question="<image> and <image>")],
         r"sample 2 \(id 'img-2'\) has 2 <image> tag\(s\) but 1 image"),
        ([{"id": "t", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}],
         r"sample 0 \(id 't'\) has 1 <image> tag\(s\) but 0 image"),
        ([image_record(0, "wide.png", question="no tag")], r"sample 0 \(id 'img-0'\) has an image but no <image>"),
    ],
)
def test_bad_files_fail_at_construction_naming_the_sample(folder, tokenizer, content, message):
    path = write_json(folder / "data.json", content)
    with pytest.raises(ValueError, match=message):
        LazySupervisedDataset(path, tokenizer, data_args(folder))


def test_invalid_json_and_missing_file_name_the_file(folder, tokenizer):
    (folder / "bad.jsonl").write_text(json.dumps(text_record(0)) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid JSON"):
        LazySupervisedDataset(str(folder / "bad.jsonl"), tokenizer, data_args(folder))
    with pytest.raises(FileNotFoundError, match=r"--data_path .*nope\.json"):
        LazySupervisedDataset(str(folder / "nope.json"), tokenizer, data_args(folder))
