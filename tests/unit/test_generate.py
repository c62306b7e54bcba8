"""Greedy answering (`evaluate/generate.py`) on a tiny random InternVL: prompts as in training, batching exact."""

import pytest
import torch
from PIL import Image

from internvl_tune.constants import IMG_CONTEXT_TOKEN
from internvl_tune.data.images import image_geometry
from internvl_tune.data.transform import SampleBuilder, SampleSettings
from internvl_tune.evaluate.generate import answer_questions, item_prompt, left_pad
from internvl_tune.testing.tiny import build_tiny_model

SYSTEM = "You are a helpful assistant."
TILE = 56  # tiny config: 56 px tiles, 4 image tokens each


@pytest.fixture(scope="module")
def model_and_tokenizer():
    model, tokenizer = build_tiny_model(seed=0)
    return model.eval(), tokenizer


def settings(**overrides) -> SampleSettings:
    values = dict(system_message=SYSTEM, image_size=TILE, num_image_token=4, max_dynamic_patch=2, use_thumbnail=True)
    return SampleSettings(**{**values, **overrides})


def test_left_pad():
    input_ids, attention_mask = left_pad([[5, 6, 7], [5, 8]], pad_token_id=9)
    assert input_ids.tolist() == [[5, 6, 7], [9, 5, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]


def test_prompt_is_the_training_sample_up_to_the_answer(model_and_tokenizer, tmp_path):
    """A 112x56 image with 56 px tiles and 2 tiles at most: grid 2x1 + thumbnail = 3 tiles, 3 x 4 = 12 tokens."""
    _, tokenizer = model_and_tokenizer
    path = tmp_path / "wide.png"
    Image.new("RGB", (112, 56), (200, 30, 30)).save(path)
    s = settings()
    prompt = item_prompt(tokenizer, {"image": str(path), "question": "What colour is the shape?"}, s)
    image_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert prompt.input_ids.count(image_token_id) == 12
    assert tuple(prompt.pixel_values.shape) == (3, 3, TILE, TILE)

    record = {
        "image": str(path),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    builder = SampleBuilder(tokenizer, s)
    sample = builder(record, "test:1", None, rng=None)
    trained = sample["input_ids"][len(prompt.input_ids) :]
    assert sample["input_ids"][: len(prompt.input_ids)].tolist() == prompt.input_ids
    assert tokenizer.decode(trained) == "red<|im_end|>\n"
    assert torch.equal(sample["pixel_values"], prompt.pixel_values)


def test_text_only_prompt_has_no_image_tokens(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    prompt = item_prompt(tokenizer, {"image": None, "question": "Hello!"}, settings())
    assert prompt.pixel_values is None
    assert tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) not in prompt.input_ids
    assert tokenizer.decode(prompt.input_ids).endswith("Hello!<|im_end|>\n<|im_start|>assistant\n")


def test_batched_answers_equal_one_at_a_time(model_and_tokenizer):
    """Prompts of different lengths (1 tile, 3 tiles, no image) in one left-padded batch; greedy is deterministic."""
    model, tokenizer = model_and_tokenizer
    geometry = image_geometry(model.config)
    assert (geometry.image_size, geometry.num_image_token) == (TILE, 4)
    items = [
        {"image": Image.new("RGB", (56, 56), (255, 0, 0)), "question": "What colour is the shape?"},
        {"image": Image.new("RGB", (112, 56), (0, 0, 255)), "question": "How many shapes are there?"},
        {"image": None, "question": "Hello!"},
        {"image": Image.new("RGB", (40, 90), (0, 160, 0)), "question": "What shape is it?"},
    ]
    batched = answer_questions(model, tokenizer, items, settings(), max_new_tokens=8, batch_size=4)
    single = [answer_questions(model, tokenizer, [item], settings(), max_new_tokens=8)[0] for item in items]
    assert batched == single
    assert all(isinstance(answer, str) and answer == answer.strip() for answer in batched)
    assert not model.training
