"""Shared fixtures: a tiny tokenizer and model folder built offline, and small on-disk datasets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from internvl_tune.testing.tiny import build_tiny_tokenizer, save_tiny_model

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory) -> Path:
    """The package's user cache (weights fingerprints, lengths of read-only data) in a folder of the test session,
    not the home directory; subprocesses inherit it."""
    path = tmp_path_factory.mktemp("xdg_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_model")
    save_tiny_model(path)
    return path


def draw_image(path: Path, size: tuple[int, int], colour: str) -> None:
    image = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(image).ellipse((4, 4, size[0] - 4, size[1] - 4), fill=COLOURS[colour])
    image.save(path)


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))


def write_meta(path: Path, datasets: dict) -> Path:
    path.write_text(json.dumps(datasets))
    return path


def make_colour_dataset(root: Path, num: int = 16, *, extra_records: list | None = None) -> Path:
    """Images of one coloured ellipse with 'What colour is the shape?' and a text-only record; returns meta.json."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    sizes = [(56, 56), (112, 56), (56, 112), (90, 70)]
    for i in range(num):
        colour = list(COLOURS)[i % 3]
        draw_image(images / f"{i}.png", sizes[i % len(sizes)], colour)
        records.append(
            {
                "id": i,
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "What colour is the shape?"},
                    {"from": "gpt", "value": colour},
                ],
            }
        )
    records.append(
        {"id": "t", "conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi!"}]}
    )
    records += extra_records or []
    write_jsonl(root / "train.jsonl", records)
    return write_meta(
        root / "meta.json",
        {"colours": {"root": "images", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1}},
    )


def make_pair_dataset(root: Path, num: int = 12) -> Path:
    """Preference pairs on images of one coloured ellipse (the colour chosen, a sentence naming another rejected);
    returns meta.json."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    records = []
    for i in range(num):
        colour, wrong = colours[i % 3], colours[(i + 1) % 3]
        draw_image(root / "images" / f"{i}.png", [(56, 56), (112, 56)][i % 2], colour)
        records.append(
            {
                "image": f"{i}.png",
                "question": "What colour is the shape?",
                "chosen": colour,
                "rejected": f"The shape is {wrong}.",
                "answer_gt": colour,
            }
        )
    write_jsonl(root / "pairs.jsonl", records)
    return write_meta(
        root / "meta.json", {"colours": {"root": "images", "annotation": "pairs.jsonl", "repeat_time": 1}}
    )


# A reward that differs between the tiny model's random responses, so groups have advantages to learn from.
RL_REWARD_MODULE = """
def letters(response, record):
    return len(set(response)) / 10.0


def fewer_letters(response, record):
    return -len(set(response)) / 10.0
"""


def make_prompts(root: Path, num: int = 6) -> Path:
    """Prompt files in the `sample` format: half with an image, half text-only."""
    root.mkdir(parents=True, exist_ok=True)
    for colour in ("red", "blue"):
        draw_image(root / f"{colour}.png", (56, 84), colour)
    records = [
        {"image": f"{c}.png", "question": "<image>\nWhat colour is it?", "answer": c}
        if i % 2 == 0
        else {"question": f"How many sides has shape {i}?", "answer": str(i)}
        for i, c in zip(range(num), ["red", "blue"] * num, strict=False)
    ]
    write_jsonl(root / "prompts.jsonl", records)
    meta = root / "meta.json"
    meta.write_text(json.dumps({"p": {"root": str(root), "annotation": str(root / "prompts.jsonl")}}))
    return meta


def write_rl_run(root: Path, model_dir: Path, monkeypatch, rl_extra: str) -> Path:
    """The 2-rank RL runs' config (test_ddp.py, test_sharded.py): 2 steps of 4 prompts x 4 responses in updates of
    2 prompts, the `letters` reward importable by launched ranks (PYTHONPATH), and `rl_extra` YAML fields of `rl`."""
    meta = make_prompts(root / "data")
    (root / "rl_test_rewards.py").write_text(RL_REWARD_MODULE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    config = root / "rl.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {model_dir}, grad_checkpoint: false}}\n"
        f"data: {{meta_path: {meta}, max_dynamic_patch: 4, max_seq_length: 512}}\n"
        "train: {max_steps: 2, learning_rate: 5.0e-3}\n"
        "rl: {num_generations: 4, prompts_per_step: 4, mini_batch_size: 2, max_new_tokens: 8, prompt_version: direct,\n"
        f"     rewards: ['rl_test_rewards:letters'], reward_weights: [1.0], {rl_extra}}}\n"
    )
    return config
