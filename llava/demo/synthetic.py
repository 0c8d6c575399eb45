"""Synthetic multimodal data for the demo: coloured shapes in the quadrants of a plain background.

Every answer needs the image (which colour, which shape where, how many, is there a ...), the same seed
always gives the same images and JSON, and the files are in LLaVA's format: stage 1 captions
(`pretrain.json`), stage 2 multi-turn conversations (`instruct.json`) and held-out single questions on
unseen images (`eval.json`, each sample also carrying `question_type` and `answer`).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
KINDS = ("circle", "square", "triangle", "diamond")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("color", "shape", "count", "presence")
CHANCE_ACCURACY = {"color": 1 / len(COLORS), "shape": 1 / len(KINDS), "count": 1 / len(POSITIONS), "presence": 0.5}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    position: str  # one of POSITIONS (the quadrant)
    center: tuple[int, int]  # pixels
    radius: int  # pixels


@dataclass(frozen=True)
class Scene:
    """What an image shows; every question's answer is computed from it."""

    image_size: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    def shape_at(self, position: str) -> Shape | None:
        return next((shape for shape in self.shapes if shape.position == position), None)

    def shape_of_kind(self, kind: str) -> Shape | None:
        return next((shape for shape in self.shapes if shape.kind == kind), None)

    def has(self, color: str, kind: str) -> bool:
        return any(shape.color == color and shape.kind == kind for shape in self.shapes)


@dataclass(frozen=True)
class Question:
    question_type: str  # one of QUESTION_TYPES
    text: str
    answer: str


def make_scene(rng: random.Random, image_size: int) -> Scene:
    """One to four shapes of distinct kinds, each in its own quadrant, with a little jitter in place and size."""
    count = rng.randint(1, len(POSITIONS))
    kinds = rng.sample(KINDS, count)
    positions = rng.sample(POSITIONS, count)
    quadrant = image_size // 2
    shapes = []
    for kind, position in zip(kinds, positions):
        row, column = POSITIONS.index(position) // 2, POSITIONS.index(position) % 2
        radius = round(quadrant * rng.uniform(0.28, 0.36))
        jitter = max(1, quadrant // 10)
        center = (column * quadrant + quadrant // 2 + rng.randint(-jitter, jitter),
                  row * quadrant + quadrant // 2 + rng.randint(-jitter, jitter))
        shapes.append(Shape(kind, rng.choice(list(COLORS)), position, center, radius))
    background = tuple(rng.randint(200, 250) for _ in range(3))
    return Scene(image_size, background, tuple(shapes))


def draw_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.image_size, scene.image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x, y, r = *shape.center, shape.radius
        fill = COLORS[shape.color]
        if shape.kind == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        elif shape.kind == "triangle":
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        else:
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    return image


def caption(scene: Scene) -> str:
    parts = [f"a {shape.color} {shape.kind} at the {shape.position}" for shape in scene.shapes]
    return (", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]) + "."


def ask(scene: Scene, question_type: str, rng: random.Random) -> Question:
    """A question of `question_type` about `scene` and its one-word answer."""
    if question_type == "color":
        shape = rng.choice(scene.shapes)
        return Question("color", f"What color is the {shape.kind}?", shape.color)
    if question_type == "shape":
        shape = rng.choice(scene.shapes)
        return Question("shape", f"What shape is at the {shape.position}?", shape.kind)
    if question_type == "count":
        return Question("count", "How many shapes are there?", NUMBER_WORDS[len(scene.shapes)])
    if question_type == "presence":
        if rng.random() < 0.5:
            shape = rng.choice(scene.shapes)
            color, kind = shape.color, shape.kind
        else:
            absent = [(c, k) for c in COLORS for k in KINDS if not scene.has(c, k)]
            present_kinds = [pair for pair in absent if scene.shape_of_kind(pair[1])]
            color, kind = rng.choice(present_kinds if present_kinds and rng.random() < 0.5 else absent)
        return Question("presence", f"Is there a {color} {kind}?", "yes" if scene.has(color, kind) else "no")
    raise ValueError(f"unknown question type {question_type!r}; valid: {', '.join(QUESTION_TYPES)}")


@dataclass(frozen=True)
class DemoData:
    image_folder: str
    pretrain_json: str
    instruct_json: str
    eval_json: str
    scenes_json: str
    num_train: int
    num_eval: int


def _sample(sample_id: str, image: str, turns: list[tuple[str, str]]) -> dict:
    conversations = []
    for index, (question, answer) in enumerate(turns):
        prompt = f"<image>\n{question}" if index == 0 else question
        conversations += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
    return {"id": sample_id, "image": image, "conversations": conversations}


def write_dataset(root: str | Path, num_train: int = 2000, num_eval: int = 200, image_size: int = 84,
                  seed: int = 0) -> DemoData:
    """Draw `num_train` training and `num_eval` held-out images under `root` and write the JSON files.

    Training images get a caption (stage 1) and one question of every type (stage 2, in random order);
    each held-out image gets one question, the types taking turns so that every type is equally present.
    """
    if num_train < 1 or num_eval < 1:
        raise ValueError(f"num_train and num_eval must be >= 1, got {num_train} and {num_eval}")
    if image_size < 28:
        raise ValueError(f"image_size must be at least 28 pixels, got {image_size}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pretrain, instruct, held_out, scenes = [], [], [], {}
    for index in range(num_train + num_eval):
        scene = make_scene(rng, image_size)
        split = "train" if index < num_train else "eval"
        name = f"{split}_{index:05d}.png"
        draw_scene(scene).save(root / "images" / name)
        scenes[name] = asdict(scene)
        if split == "train":
            pretrain.append(_sample(f"pretrain-{index}", name, [("Describe the image.", caption(scene))]))
            types = rng.sample(QUESTION_TYPES, len(QUESTION_TYPES))
            turns = [ask(scene, question_type, rng) for question_type in types]
            instruct.append(_sample(f"instruct-{index}", name, [(q.text, q.answer) for q in turns]))
        else:
            question = ask(scene, QUESTION_TYPES[(index - num_train) % len(QUESTION_TYPES)], rng)
            sample = _sample(f"eval-{index}", name, [(question.text, question.answer)])
            held_out.append({**sample, "question": question.text, "answer": question.answer,
                             "question_type": question.question_type})
    paths = {name: root / f"{name}.json" for name in ("pretrain", "instruct", "eval", "scenes")}
    for name, content in (("pretrain", pretrain), ("instruct", instruct), ("eval", held_out), ("scenes", scenes)):
        paths[name].write_text(json.dumps(content, indent=1))
    return DemoData(str(root / "images"), str(paths["pretrain"]), str(paths["instruct"]), str(paths["eval"]),
                    str(paths["scenes"]), num_train, num_eval)


def answer_is_correct(prediction: str, answer: str) -> bool:
    """One-word answers: the first word of the prediction, lower-cased and without punctuation."""
    words = prediction.strip().lower().replace(".", " ").replace(",", " ").split()
    return bool(words) and words[0] == answer.lower()
