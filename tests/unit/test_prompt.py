"""One inference prompt for every generating command (data/prompt.py): chat and evaluation agree, and the tiling
follows the training settings, `min_dynamic_patch` included."""

import json
import shutil

import pytest
import torch
from PIL import Image

from internvl_tune.chat import ChatSession
from internvl_tune.checkpoints.metadata import checkpoint_sample_settings
from internvl_tune.constants import IMG_CONTEXT_TOKEN
from internvl_tune.data.placeholders import user_turn
from internvl_tune.data.prompt import build_inference_prompt
from internvl_tune.data.transform import SampleSettings
from internvl_tune.evaluate.generate import item_prompt

TILE = 56  # tiny config: 56 px tiles, 4 image tokens each


def settings(**overrides) -> SampleSettings:
    return SampleSettings(**{"image_size": TILE, "num_image_token": 4, "max_dynamic_patch": 4, **overrides})


def test_user_turn():
    assert user_turn("Hi", 0) == "Hi"
    assert user_turn("What?", 1) == "<image>\nWhat?"
    assert user_turn("Same?", 2) == "Image-1: <image>\nImage-2: <image>\nSame?"
    assert user_turn("Is <image> like <image>?", 2) == "Is <image> like <image>?"


def test_min_dynamic_patch_changes_the_tiling(tokenizer):
    """A 56x56 image, 56 px tiles, at most 4: with min 1 the 1x1 grid fits exactly (1 tile, no thumbnail); with min 2
    the closest grid to ratio 1 with 2..4 tiles is 2x2, plus the thumbnail: 5 tiles, 20 image tokens."""
    item = {"image": Image.new("RGB", (56, 56), (200, 30, 30)), "question": "What colour?"}
    context = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    one = item_prompt(tokenizer, item, settings(min_dynamic_patch=1))
    five = item_prompt(tokenizer, item, settings(min_dynamic_patch=2))
    assert (one.num_tiles, one.input_ids.count(context), tuple(one.pixel_values.shape)) == ([1], 4, (1, 3, TILE, TILE))
    assert (five.num_tiles, five.input_ids.count(context), tuple(five.pixel_values.shape)) == (
        [5],
        20,
        (5, 3, TILE, TILE),
    )


def test_placeholders_must_match_the_images(tokenizer):
    messages = [{"role": "user", "content": "<image>\nWhat?"}]
    with pytest.raises(ValueError, match="1 <image> placeholders in the conversation for 0 images"):
        build_inference_prompt(tokenizer, messages, [], settings())


@pytest.fixture(scope="module")
def checkpoint_min_2(tiny_model_dir, tmp_path_factory):
    """The tiny model with image settings recorded as training would: at least 2 tiles, at most 4, no thumbnail."""
    path = tmp_path_factory.mktemp("min2") / "model"
    shutil.copytree(tiny_model_dir, path)
    image = {"dynamic_image_size": True, "use_thumbnail": False, "min_dynamic_patch": 2, "max_dynamic_patch": 4}
    metadata = {"template": "internvl2_5", "system_message": "Be brief.", "image": image}
    (path / "internvl_tune.json").write_text(json.dumps(metadata))
    return path


def test_chat_and_evaluation_build_the_same_prompt(checkpoint_min_2, tmp_path):
    """The checkpoint's settings reach both commands: 56x56 with 2..4 tiles is a 2x2 grid (no thumbnail), where the
    old hard-coded minimum of 1 gave one tile."""
    Image.new("RGB", (56, 56), (30, 30, 220)).save(tmp_path / "square.png")
    session = ChatSession(str(checkpoint_min_2), max_new_tokens=2)
    assert (session.settings.min_dynamic_patch, session.settings.use_thumbnail) == (2, False)
    question = "What colour is the shape?"
    image = str(tmp_path / "square.png")
    chat = session.prompt([{"role": "user", "content": user_turn(question, 1)}], [image])
    settings = checkpoint_sample_settings(checkpoint_min_2, session.model.config)  # what evaluation is given
    evaluation = item_prompt(session.tokenizer, {"image": image, "question": question}, settings)
    assert chat.input_ids == evaluation.input_ids
    assert torch.equal(chat.pixel_values, evaluation.pixel_values)
    assert chat.num_tiles == evaluation.num_tiles == [4]
    assert "Be brief." in session.tokenizer.decode(chat.input_ids)
