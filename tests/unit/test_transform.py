"""Record -> sample: placeholder expansion, tile budgets and every bad input of the foundation issue."""

import random

import pytest
import torch
from conftest import draw_image

from internvl_tune.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN
from internvl_tune.data.errors import DataError
from internvl_tune.data.meta import DatasetEntry
from internvl_tune.data.transform import SampleBuilder, SampleSettings, record_to_conversation

TOKENS_PER_TILE = 4  # the tiny model: (56 / 14)^2 * 0.5^2


def _settings(**kw):
    base = dict(image_size=56, num_image_token=TOKENS_PER_TILE, max_dynamic_patch=6, max_seq_length=2048)
    base.update(kw)
    return SampleSettings(**base)


def _entry(root, **kw):
    return DatasetEntry(name="t", root=str(root), annotation=root / "x.jsonl", data_augment=False, repeat_time=1, **kw)


def _conv(*turns):
    return [{"from": role, "value": text} for role, text in turns]


def _build(tokenizer, tmp_path, record, **settings):
    return SampleBuilder(tokenizer, _settings(**settings))(record, "x.jsonl:7", _entry(tmp_path), random.Random(0))


def test_single_image_gets_placeholder_prepended_and_tiles(tokenizer, tmp_path):
    draw_image(tmp_path / "a.png", (112, 56), "red")  # 2x1 grid + thumbnail = 3 tiles
    record = {"image": "a.png", "conversations": _conv(("human", "What colour?"), ("gpt", "red"))}
    sample = _build(tokenizer, tmp_path, record)
    assert sample["num_tiles"] == [3]
    assert sample["pixel_values"].shape == (3, 3, 56, 56)
    ids = sample["input_ids"].tolist()
    assert ids.count(tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)) == 3 * TOKENS_PER_TILE
    text = tokenizer.decode(ids)
    assert "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 12 + "</img>\nWhat colour?<|im_end|>" in text
    trained = [t for t, label in zip(ids, sample["labels"].tolist(), strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == "red<|im_end|>"
    assert sample["num_image_tokens"] == 12 and sample["num_text_tokens"] == len(ids) - 12


def test_multi_image_splits_the_tile_budget_in_order(tokenizer, tmp_path):
    draw_image(tmp_path / "a.png", (224, 56), "red")  # wants 4x1 (+thumb) but the budget is 6 // 2 = 3 -> 3x1 + 1
    draw_image(tmp_path / "b.png", (56, 56), "blue")  # 1 tile, no thumbnail
    record = {
        "image": ["a.png", "b.png"],
        "conversations": _conv(("human", "<image>\nand <image>\nsame?"), ("gpt", "no")),
    }
    sample = _build(tokenizer, tmp_path, record)
    assert sample["num_tiles"] == [4, 1]
    text = tokenizer.decode(sample["input_ids"])
    assert "<img>" + "<IMG_CONTEXT>" * 16 + "</img>\nand <img>" + "<IMG_CONTEXT>" * 4 + "</img>\nsame?" in text


def test_meta_max_dynamic_patch_overrides_the_setting(tokenizer, tmp_path):
    draw_image(tmp_path / "a.png", (224, 56), "red")
    record = {"image": "a.png", "conversations": _conv(("human", "x"), ("gpt", "y"))}
    entry = _entry(tmp_path, max_dynamic_patch=2)
    sample = SampleBuilder(tokenizer, _settings())(record, "x:1", entry, random.Random(0))
    assert sample["num_tiles"] == [3]  # 2x1 + thumbnail


def test_pure_text_has_no_pixels(tokenizer, tmp_path):
    sample = _build(tokenizer, tmp_path, {"conversations": _conv(("human", "Hello!"), ("gpt", "Hi!"))})
    assert sample["pixel_values"] is None and sample["num_image_tokens"] == 0


def test_video_expands_frames(tokenizer, tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(6):
        draw_image(folder / f"frame_{i}.png", (56, 56), "green")
    record = {"video": "clip", "conversations": _conv(("human", "What happens?"), ("gpt", "nothing"))}
    sample = _build(tokenizer, tmp_path, record, min_num_frame=4, max_num_frame=4)
    assert sample["num_tiles"] == [1, 1, 1, 1] and sample["pixel_values"].shape[0] == 4
    span = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
    expected = "".join(f"Frame-{i}: {span}\n" for i in range(1, 5)) + "What happens?"
    assert expected in tokenizer.decode(sample["input_ids"])


def test_system_turn_is_used(tokenizer, tmp_path):
    record = {"conversations": _conv(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello"))}
    text = tokenizer.decode(_build(tokenizer, tmp_path, record)["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")


def test_text_beyond_max_length_is_truncated_and_flagged(tokenizer, tmp_path):
    record = {"conversations": _conv(("human", "Hi"), ("gpt", "one two three four five six " * 20))}
    full = _build(tokenizer, tmp_path, record)
    cut = _build(tokenizer, tmp_path, record, max_seq_length=len(full["input_ids"]) - 5)
    assert cut["truncated"] and len(cut["input_ids"]) == len(full["input_ids"]) - 5
    assert torch.equal(cut["input_ids"], full["input_ids"][:-5])


@pytest.mark.parametrize(
    "record, kind, message",
    [
        ({"id": 1}, "missing field", "field 'conversations' is required"),
        ({"conversations": [{"from": "bot", "value": "x"}]}, "bad turn", "conversations[0] must be"),
        ({"conversations": _conv(("gpt", "a"), ("human", "b"))}, "role order", "wrong role order"),
        ({"conversations": _conv(("human", "a"), ("human", "b"))}, "role order", "wrong role order"),
        ({"conversations": _conv(("human", "a"))}, "role order", "ending with 'gpt'"),
        ({"conversations": _conv(("human", "a"), ("gpt", "b"), ("system", "c"))}, "role order", "wrong role order"),
        ({"conversations": _conv(("human", "<image> a"), ("gpt", "b"))}, "image count", "1 '<image>' placeholder"),
        (
            {"image": ["a.png", "a.png"], "conversations": _conv(("human", "<image> a"), ("gpt", "b"))},
            "image count",
            "1 '<image>' placeholder(s) in the human turns but 2 image(s)",
        ),
        (
            {"image": "a.png", "conversations": _conv(("human", "<image><image> a"), ("gpt", "b"))},
            "image count",
            "2 '<image>' placeholder(s)",
        ),
        (
            {"conversations": _conv(("human", "<img><IMG_CONTEXT></img> a"), ("gpt", "b"))},
            "image count",
            "literal token '<img>'",
        ),
        ({"image": 5, "conversations": _conv(("human", "a"), ("gpt", "b"))}, "invalid record", "field 'image'"),
    ],
)
def test_bad_records_name_file_line_and_problem(record, kind, message):
    with pytest.raises(DataError) as e:
        record_to_conversation(record, "data/x.jsonl:12")
    assert str(e.value).startswith("data/x.jsonl:12: ") and message in str(e.value)
    assert e.value.kind == kind


def test_missing_and_unreadable_images(tokenizer, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for name in ("missing.png", "bad.png"):
        record = {"image": name, "conversations": _conv(("human", "a"), ("gpt", "b"))}
        with pytest.raises(DataError) as e:
            _build(tokenizer, tmp_path, record)
        assert str(e.value).startswith("x.jsonl:7: ") and name in str(e.value) and e.value.kind == "unreadable media"


def test_missing_video(tokenizer, tmp_path):
    record = {"video": "nope.mp4", "conversations": _conv(("human", "a"), ("gpt", "b"))}
    with pytest.raises(DataError, match="x.jsonl:7: .*nope.mp4"):
        _build(tokenizer, tmp_path, record)


def test_image_tokens_cut_by_max_seq_length_is_an_error(tokenizer, tmp_path):
    draw_image(tmp_path / "a.png", (224, 56), "red")  # 5 tiles = 20 image tokens
    record = {"image": "a.png", "conversations": _conv(("human", "What colour?"), ("gpt", "red"))}
    full = _build(tokenizer, tmp_path, record)
    image_end = full["input_ids"].tolist().index(tokenizer.convert_tokens_to_ids(IMG_END_TOKEN))
    for limit in (image_end - 3, image_end):  # inside the image span, and right at its </img>
        with pytest.raises(DataError) as e:
            _build(tokenizer, tmp_path, record, max_seq_length=limit)
        assert e.value.kind == "image tokens cut" and f"max_seq_length={limit}" in str(e.value)
        assert "20 of them image tokens" in str(e.value)


def test_no_trained_tokens_left_after_truncation(tokenizer, tmp_path):
    record = {"conversations": _conv(("human", "a long question " * 10), ("gpt", "b"))}
    with pytest.raises(DataError) as e:
        _build(tokenizer, tmp_path, record, max_seq_length=20)
    assert e.value.kind == "no trained tokens"
