"""Shared test fixtures: tiny models built once per session, a tiny LLaVA-JSON data set, a CLI runner.

Everything is offline and CPU-only. Tests marked ``gpu`` are skipped when CUDA is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
# The tests never reach a hub: fail fast instead of retrying the network.
os.environ.update(OFFLINE_ENV)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """``TinyModelPaths(llm, vision_tower)``: a 4-layer Llama with its tokenizer and a 2-layer CLIP (56 px)."""
    from llava.tiny_models import build_tiny_models

    return build_tiny_models(str(tmp_path_factory.mktemp("tiny-models")))


@dataclass(frozen=True)
class TinyDataset:
    image_folder: str
    pretrain_json: str  # stage 1: <image> + caption pairs (plain template)
    instruct_json: str  # stage 2: multi-turn image conversations and text-only samples (v1 template)
    num_image_samples: int
    num_text_samples: int


WORDS = ["red", "green", "blue", "square", "circle", "small", "large", "picture", "shows", "a", "the", "color"]


def write_tiny_llava_dataset(root: Path, num_image_samples: int = 6, num_text_samples: int = 2) -> TinyDataset:
    """Solid-colour PIL images of varied sizes plus LLaVA-format JSON files describing them."""
    from PIL import Image

    image_folder = root / "images"
    (image_folder / "sub").mkdir(parents=True, exist_ok=True)
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    sizes = [(64, 48), (40, 72), (56, 56), (90, 30)]
    pretrain, instruct = [], []
    for i in range(num_image_samples):
        color_name = WORDS[i % 3]
        rel = f"sub/img_{i}.png" if i % 2 else f"img_{i}.jpg"
        Image.new("RGB", sizes[i % len(sizes)], colors[i % len(colors)]).save(image_folder / rel)
        caption = f"a {color_name} picture shows the color {color_name}"
        pretrain.append({
            "id": f"pre-{i}",
            "image": rel,
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the picture."},
                {"from": "gpt", "value": caption},
            ],
        })
        instruct.append({
            "id": f"ins-{i}",
            "image": rel,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the picture?"},
                {"from": "gpt", "value": f"The picture is {color_name}."},
                {"from": "human", "value": "Is it large?"},
                {"from": "gpt", "value": "It is small." if i % 2 else "It is large."},
            ],
        })
    for i in range(num_text_samples):
        instruct.append({
            "id": f"text-{i}",
            "conversations": [
                {"from": "human", "value": f"Name a color number {i}."},
                {"from": "gpt", "value": WORDS[i % 3]},
            ],
        })
    pretrain_json, instruct_json = root / "pretrain.json", root / "instruct.json"
    pretrain_json.write_text(json.dumps(pretrain))
    instruct_json.write_text(json.dumps(instruct))
    return TinyDataset(str(image_folder), str(pretrain_json), str(instruct_json), num_image_samples, num_text_samples)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    return write_tiny_llava_dataset(tmp_path_factory.mktemp("tiny-data"))


def subprocess_env(**overrides) -> dict:
    """The current environment, offline, one thread per process unless the caller says otherwise."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.setdefault("OMP_NUM_THREADS", "2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def run_command(cmd, env=None, timeout=600, expect_success=True) -> subprocess.CompletedProcess:
    """Run a command from the repository root; on an unexpected exit code fail with the output's tail."""
    result = subprocess.run(
        [str(c) for c in cmd],
        cwd=REPO_ROOT,
        env=env or subprocess_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect_success and result.returncode != 0:
        pytest.fail(
            f"command failed ({result.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}"
        )
    return result


def run_train(args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m llava.train.train <args>`` in a subprocess (the real entry point)."""
    return run_command([sys.executable, "-m", "llava.train.train", *args], env=env, **kwargs)


def tiny_script_env(tiny_models, tiny_dataset, output_dir, **overrides) -> dict:
    """Environment for the stage scripts (scripts/*.sh): tiny models, one process, fp32, two steps."""
    settings = dict(
        LAUNCHER="python",
        PYTHON=sys.executable,
        MODEL=tiny_models.llm,
        VISION_TOWER=tiny_models.vision_tower,
        IMAGE_FOLDER=tiny_dataset.image_folder,
        OUTPUT_DIR=output_dir,
        NUM_GPUS=1,
        GLOBAL_BATCH=4,
        PER_DEVICE_BATCH=2,
        MAX_STEPS=2,
        MODEL_MAX_LENGTH=256,
        NUM_WORKERS=0,
        PRECISION_FLAGS="--bf16 False --tf32 False",
    )
    settings.update(overrides)
    return subprocess_env(**settings)


@pytest.fixture(scope="session")
def pmod_checkpoint(tiny_models, tmp_path_factory) -> str:
    """A tiny p-MoD LLaVA checkpoint (seeded random weights, tokenizer included) in a folder named `pmod`."""
    from llava.eval.tiny_checkpoint import build_tiny_llava_checkpoint

    return build_tiny_llava_checkpoint(tiny_models, str(tmp_path_factory.mktemp("checkpoint") / "pmod"), pmod=True)


@pytest.fixture(scope="session")
def shapes_picture(tmp_path_factory) -> Path:
    """A small PNG: a red square on a light background."""
    from PIL import Image

    path = tmp_path_factory.mktemp("picture") / "shapes.png"
    image = Image.new("RGB", (96, 72), (235, 235, 235))
    image.paste((200, 30, 30), (10, 10, 50, 50))
    image.save(path)
    return path

