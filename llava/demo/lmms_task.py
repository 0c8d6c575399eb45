"""A local lmms-eval task on the demo's held-out questions: a json-lines data file and a task yaml.

lmms-eval loads the task with `--include_path <folder>`; the yaml points at the functions below, which
show the image, ask the question and score a one-word answer (exact match after normalisation).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from llava.demo.synthetic import answer_is_correct

TASK_NAME = "pmod_demo_shapes"
METRIC = "exact_match"


def doc_to_visual(doc: dict) -> list:
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list) -> dict:
    return {METRIC: float(answer_is_correct(results[0], doc["answer"]))}


def write_task(folder: str | Path, eval_json: str | Path, image_folder: str | Path, max_new_tokens: int = 4) -> Path:
    """Write `<folder>/<TASK_NAME>.yaml` and its data file from the LLaVA-format held-out questions."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, sample in enumerate(json.loads(Path(eval_json).read_text())):
        missing = [key for key in ("image", "question", "answer", "question_type") if key not in sample]
        if missing:
            raise ValueError(f"{eval_json}: sample {index} lacks {', '.join(missing)}")
        rows.append({"question_id": sample["id"], "image_path": str(Path(image_folder).resolve() / sample["image"]),
                     "question": sample["question"], "answer": sample["answer"],
                     "question_type": sample["question_type"]})
    data_file = folder / f"{TASK_NAME}.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    module = __name__
    (folder / f"{TASK_NAME}.yaml").write_text(
        f"task: {TASK_NAME}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data_file}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {module}.doc_to_visual\n"
        f"doc_to_text: !function {module}.doc_to_text\n"
        "doc_to_target: answer\n"
        f"process_results: !function {module}.process_results\n"
        "metric_list:\n"
        f"  - metric: {METRIC}\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "generation_kwargs:\n"
        f"  max_new_tokens: {max_new_tokens}\n"
        "  temperature: 0\n"
        "  do_sample: false\n"
        "  until:\n"
        "    - \"\\n\"\n"
        "metadata:\n"
        "  - version: 0.0\n"
    )
    return folder
