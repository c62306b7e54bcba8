"""A synthetic visual task for the demo: coloured shapes on a white background, drawn with PIL.

Each image holds one to four shapes of one kind (circle, square or triangle) and one colour (red, green, blue,
yellow, purple or orange), at random sizes and positions, on a lightly noisy white background. Images are square,
twice as wide or twice as tall, at random sizes, so with two-tile budgets some become one tile and some a 2x1 or
1x2 grid plus a thumbnail. Three question types:

    type    question                                         answer
    colour  "What colour is the shape?" / "... are the shapes?"  "red"
    count   "How many shapes are there?"                     "three"
    shape   "What shape is it?" / "What shape are they?"     "triangle"

`make_task` writes the images, `train.jsonl` (one question per image, types in turn) in the official InternVL SFT
format, `eval.jsonl` (every question type for each held-out image, with its `question_type`) and a `meta.json`
naming the training file. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("one", "two", "three", "four")
QUESTION_TYPES = ("colour", "count", "shape")
DATASET_NAME = "shapes"

# Image sides are drawn from this range (pixels) for the shorter side; aspect ratios from _ASPECTS (width / height).
_SHORT_SIDE = (56, 112)
_ASPECTS = (1.0, 1.0, 2.0, 0.5)
_NOISE_STD = 6.0


@dataclass(frozen=True)
class Scene:
    """What an image shows: its size and the shapes' kind, colour and boxes `(x0, y0, x1, y1)`."""

    width: int
    height: int
    kind: str
    colour: str
    boxes: tuple[tuple[int, int, int, int], ...]

    @property
    def num_shapes(self) -> int:
        return len(self.boxes)


@dataclass(frozen=True)
class TaskPaths:
    """Where `make_task` wrote the task."""

    root: Path
    meta: Path
    train: Path
    eval: Path


def sample_scene(rng: random.Random) -> Scene:
    """Draw a scene: size, kind, colour, and 1-4 non-overlapping boxes (square, side 18-35% of the short side)."""
    aspect = rng.choice(_ASPECTS)
    short = rng.randint(*_SHORT_SIDE)
    width, height = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    num_shapes = rng.randint(1, len(NUMBER_WORDS))
    while True:  # rejection sampling; four small boxes always fit quickly
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(100):
            side = round(short * rng.uniform(0.18, 0.35))
            x0, y0 = rng.randint(1, width - side - 2), rng.randint(1, height - side - 2)
            box = (x0, y0, x0 + side, y0 + side)
            if all(not _overlap(box, other, margin=2) for other in boxes):
                boxes.append(box)
                if len(boxes) == num_shapes:
                    return Scene(width, height, rng.choice(SHAPES), rng.choice(list(COLOURS)), tuple(boxes))


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (a[2] + margin < b[0] or b[2] + margin < a[0] or a[3] + margin < b[1] or b[3] + margin < a[1])


def draw_scene(scene: Scene, noise_seed: int) -> Image.Image:
    """Render a scene as an RGB image."""
    noise = np.random.default_rng(noise_seed).normal(0.0, _NOISE_STD, (scene.height, scene.width, 3))
    background = np.clip(255.0 - np.abs(noise), 0, 255).astype(np.uint8)
    image = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    for x0, y0, x1, y1 in scene.boxes:
        if scene.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif scene.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def question_answer(scene: Scene, question_type: str) -> tuple[str, str]:
    """The question of a type about a scene, and its answer."""
    many = scene.num_shapes > 1
    if question_type == "colour":
        return ("What colour are the shapes?" if many else "What colour is the shape?"), scene.colour
    if question_type == "count":
        return "How many shapes are there?", NUMBER_WORDS[scene.num_shapes - 1]
    if question_type == "shape":
        return ("What shape are they?" if many else "What shape is it?"), scene.kind
    raise ValueError(f"unknown question type {question_type!r}; known types: {', '.join(QUESTION_TYPES)}")


def task_texts() -> list[str]:
    """Every question and answer of the task, to train the tiny tokenizer on."""
    texts = [*COLOURS, *SHAPES, *NUMBER_WORDS]
    texts += ["What colour is the shape?", "What colour are the shapes?", "How many shapes are there?"]
    texts += ["What shape is it?", "What shape are they?"]
    return texts


def normalize_answer(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: `" Red."` -> `"red"`."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def make_task(output_dir: str | Path, num_train: int, num_eval: int, seed: int) -> TaskPaths:
    """Write the task under `output_dir`: `images/`, `train.jsonl`, `eval.jsonl` and `meta.json`.

    Training images are numbered first, then the held-out ones, and no image appears in both files.
    """
    root = Path(output_dir)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train_records: list[dict[str, Any]] = []
    eval_records: list[dict[str, Any]] = []
    for index in range(num_train + num_eval):
        scene = sample_scene(rng)
        name = f"{index:05d}.png"
        draw_scene(scene, noise_seed=seed * 1_000_003 + index).save(images / name)
        if index < num_train:
            question, answer = question_answer(scene, QUESTION_TYPES[index % len(QUESTION_TYPES)])
            train_records.append(_record(f"train-{index}", name, question, answer))
        else:
            for question_type in QUESTION_TYPES:
                question, answer = question_answer(scene, question_type)
                record = _record(f"eval-{index}-{question_type}", name, question, answer)
                eval_records.append({**record, "question_type": question_type})
    paths = TaskPaths(root=root, meta=root / "meta.json", train=root / "train.jsonl", eval=root / "eval.jsonl")
    _write_jsonl(paths.train, train_records)
    _write_jsonl(paths.eval, eval_records)
    meta = {DATASET_NAME: {"root": "images", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1}}
    paths.meta.write_text(json.dumps(meta, indent=2) + "\n")
    return paths


def read_eval(paths: TaskPaths) -> list[dict[str, str]]:
    """The held-out questions as `{"image": full path, "question", "answer", "question_type"}`."""
    items = []
    for line in paths.eval.read_text().splitlines():
        record = json.loads(line)
        human, gpt = record["conversations"]
        items.append(
            {
                "image": str(paths.root / "images" / record["image"]),
                "question": human["value"].removeprefix("<image>\n"),
                "answer": gpt["value"],
                "question_type": record["question_type"],
            }
        )
    return items


def _record(record_id: str, image: str, question: str, answer: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "image": image,
        "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}],
    }


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


_ANSWERS = {"colour": tuple(COLOURS), "count": NUMBER_WORDS, "shape": SHAPES}


@dataclass(frozen=True)
class PairPaths:
    train_meta: Path
    eval_meta: Path


def make_pairs(paths: TaskPaths, seed: int) -> PairPaths:
    """Preference pairs (MMPR format) from the task's own ground truth: the right answer is chosen, a wrong answer
    of the same question type is rejected. One pair per training question (`pairs_train.jsonl`) and per held-out
    question (`pairs_eval.jsonl`), each with its meta file.

    Example: "What colour is the shape?" on a red image -> chosen "red", rejected e.g. "blue".
    """
    rng = random.Random(seed)
    written = []
    for name, source in (("train", paths.train), ("eval", paths.eval)):
        records = []
        for line in source.read_text().splitlines():
            record = json.loads(line)
            human, gpt = record["conversations"]
            answer = gpt["value"]
            kind = next(k for k, options in _ANSWERS.items() if answer in options)
            wrong = rng.choice([option for option in _ANSWERS[kind] if option != answer])
            records.append(
                {
                    "id": record["id"],
                    "image": record["image"],
                    "question": human["value"],
                    "chosen": answer,
                    "rejected": wrong,
                    "question_type": kind,
                }
            )
        _write_jsonl(paths.root / f"pairs_{name}.jsonl", records)
        meta = paths.root / f"pairs_{name}_meta.json"
        meta.write_text(
            json.dumps({f"{DATASET_NAME}_pairs_{name}": {"root": "images", "annotation": f"pairs_{name}.jsonl"}})
        )
        written.append(meta)
    return PairPaths(*written)
