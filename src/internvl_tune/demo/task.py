"""A synthetic visual task for the demo: coloured shapes on a white background, drawn with PIL.

Each image holds one to four shapes of one kind (circle, square or triangle) and one colour (red, green, blue,
yellow, purple or orange), at random sizes and positions, on a lightly noisy white background. Images are square,
twice as wide or twice as tall, at random sizes, so with two-tile budgets some become one tile and some a 2x1 or
1x2 grid plus a thumbnail. Three question types:

    type    question                                         answer
    colour  "What colour is the shape?" / "... are the shapes?"  "red"
    count   "How many shapes are there?"                     "three"
    shape   "What shape is it?" / "What shape are they?"     "triangle"

Questions are asked in the chain-of-thought format of the preference-data tools, so that the SFT model's answers
can be sampled, judged and paired (`sample`, `build-pairs`) and evaluated with the MPO prompt (`eval --prompt cot`):
the question is wrapped by the `en` prompt version (`task_prompt`), and the answer is two fixed reasoning lines and
a final answer (`cot_answer`)::

    user       "<image>\nYour task is to answer the question below. ... \n\nQuestion:\n\nWhat colour is the shape?"
    assistant  "I look at the image.\nI check the shapes.\nFinal answer: red"

`make_task` writes the images and, all under one folder:

- `train.jsonl`: one question per training image, types in turn, in the official InternVL SFT format;
- `benchmark.jsonl`: every question type for each held-out image, `{"image", "question", "answer", "source"}`
  (the source is the question type), the input of `eval`;
- `prompts.jsonl`: the same for a second held-out set of images, the prompt file `sample` answers;
- `meta.json` naming the training file, and `prompts_meta.json` naming the prompt file (for `rl`).

No image is in two of them. Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from internvl_tune.errors import UserError
from internvl_tune.evaluate.benchmark import eval_prompt
from internvl_tune.judge import extract_answer

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
    benchmark: Path
    prompts: Path


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
    raise UserError(f"unknown question type {question_type!r}; known types: {', '.join(QUESTION_TYPES)}")


# The reasoning of every answer: fixed, so that the model learns the format at once and the answer from the image.
REASONING = "I look at the image.\nI check the shapes."
_QUESTIONS = ["What colour is the shape?", "What colour are the shapes?", "How many shapes are there?"]
_QUESTIONS += ["What shape is it?", "What shape are they?"]


def task_prompt(question: str) -> str:
    """The user turn of a question: the `en` chain-of-thought prompt, the image in front (`eval --prompt cot`'s)."""
    return eval_prompt(question, "cot", 1)


def cot_answer(answer: str) -> str:
    """The assistant turn of an answer: `REASONING`, then `"Final answer: <answer>"` (the `en` answer format)."""
    return f"{REASONING}\nFinal answer: {answer}"


def task_texts() -> list[str]:
    """Every prompt and answer of the task, to train the tiny tokenizer on."""
    return [*(task_prompt(q) for q in _QUESTIONS), *(cot_answer(a) for a in (*COLOURS, *SHAPES, *NUMBER_WORDS))]


def make_task(output_dir: str | Path, num_train: int, num_eval: int, seed: int, num_prompts: int = 0) -> TaskPaths:
    """Write the task under `output_dir`: `images/`, `train.jsonl`, `benchmark.jsonl`, `prompts.jsonl`, `meta.json`.

    Images are numbered training first, then held-out (benchmark), then prompt images, so the training and
    benchmark images of a seed do not depend on `num_prompts`.
    """
    root = Path(output_dir)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train: list[dict[str, Any]] = []
    held_out: list[dict[str, Any]] = []
    prompts: list[dict[str, Any]] = []
    for index in range(num_train + num_eval + num_prompts):
        scene = sample_scene(rng)
        name = f"{index:05d}.png"
        draw_scene(scene, noise_seed=seed * 1_000_003 + index).save(images / name)
        if index < num_train:
            question, answer = question_answer(scene, QUESTION_TYPES[index % len(QUESTION_TYPES)])
            train.append(sft_record(f"train-{index}", name, question, answer))
            continue
        for question_type in QUESTION_TYPES:
            question, answer = question_answer(scene, question_type)
            item = {"image": f"images/{name}", "question": question, "answer": answer, "source": question_type}
            (held_out if index < num_train + num_eval else prompts).append(item)
    paths = TaskPaths(root, root / "meta.json", root / "train.jsonl", root / "benchmark.jsonl", root / "prompts.jsonl")
    _write_jsonl(paths.train, train)
    _write_jsonl(paths.benchmark, held_out)
    _write_jsonl(paths.prompts, prompts)
    meta = {DATASET_NAME: {"root": "images", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1}}
    paths.meta.write_text(json.dumps(meta, indent=2) + "\n")
    prompts_meta = {f"{DATASET_NAME}_prompts": {"root": ".", "annotation": "prompts.jsonl", "repeat_time": 1}}
    (root / "prompts_meta.json").write_text(json.dumps(prompts_meta, indent=2) + "\n")
    return paths


def sft_record(record_id: str, image: str, question: str, answer: str) -> dict[str, Any]:
    """A question and its answer as a training record (official InternVL SFT format, the task's prompt and answer
    format)."""
    return {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": task_prompt(question)},
            {"from": "gpt", "value": cot_answer(answer)},
        ],
    }


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


_ANSWERS = {"colour": tuple(COLOURS), "count": NUMBER_WORDS, "shape": SHAPES}


@dataclass(frozen=True)
class PairPaths:
    train_meta: Path
    eval_meta: Path
    num_train: int
    """Pairs in the training file (one per training question)."""


def make_pairs(paths: TaskPaths, seed: int) -> PairPaths:
    """Preference pairs (MMPR format) from the task's own ground truth: the right answer is chosen, a wrong answer
    of the same question type is rejected, both in the task's answer format. One pair per training question
    (`pairs_train.jsonl`) and per benchmark question (`pairs_eval.jsonl`), each with its meta file. (The demo
    builds its pairs from the SFT model's own answers; these are for tests and examples.)

    Example: "What colour is the shape?" on a red image -> chosen `cot_answer("red")`, rejected e.g.
    `cot_answer("blue")`.
    """
    train = []
    for line in paths.train.read_text().splitlines():
        record = json.loads(line)
        human, gpt = record["conversations"]
        train.append((record["id"], record["image"], human["value"], extract_answer(gpt["value"], "en")))
    held_out = [
        (f"eval-{i}", item["image"].removeprefix("images/"), task_prompt(item["question"]), item["answer"])
        for i, item in enumerate(map(json.loads, paths.benchmark.read_text().splitlines()))
    ]
    rng = random.Random(seed)
    written = []
    for name, items in (("train", train), ("eval", held_out)):
        records = []
        for record_id, image, question, answer in items:
            kind = next(k for k, options in _ANSWERS.items() if answer in options)
            wrong = rng.choice([option for option in _ANSWERS[kind] if option != answer])
            records.append(
                {
                    "id": record_id,
                    "image": image,
                    "question": question,
                    "chosen": cot_answer(answer),
                    "rejected": cot_answer(wrong),
                    "question_type": kind,
                }
            )
        _write_jsonl(paths.root / f"pairs_{name}.jsonl", records)
        meta = paths.root / f"pairs_{name}_meta.json"
        meta.write_text(
            json.dumps({f"{DATASET_NAME}_pairs_{name}": {"root": "images", "annotation": f"pairs_{name}.jsonl"}})
        )
        written.append(meta)
    return PairPaths(*written, num_train=len(train))
