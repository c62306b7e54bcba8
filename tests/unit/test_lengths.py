"""Sample lengths for packing: measured without decoding pixels yet equal to the built samples, and cached by content."""

import json
import random

import pytest
from conftest import draw_image, make_colour_dataset, write_jsonl, write_meta

from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.errors import DataError
from internvl_tune.data.lengths import dataset_lengths
from internvl_tune.data.transform import SampleBuilder, SampleSettings


@pytest.fixture()
def builder(tokenizer):
    return SampleBuilder(tokenizer, SampleSettings(image_size=56, num_image_token=4, max_dynamic_patch=6))


def test_measure_equals_the_built_sample(tmp_path, builder):
    """Text-only, single images of several grids and a two-image record: (tokens, tiles) from headers == the sample."""
    (tmp_path / "data" / "images").mkdir(parents=True)
    draw_image(tmp_path / "data" / "images" / "wide.png", (200, 60), "red")
    meta = make_colour_dataset(
        tmp_path / "data",
        num=8,
        extra_records=[
            {
                "image": ["0.png", "wide.png"],
                "conversations": [
                    {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame colour?"},
                    {"from": "gpt", "value": "No, they differ."},
                ],
            }
        ],
    )
    dataset = RecordDataset(meta, builder, seed=0)
    for i in range(len(dataset)):
        record, where, entry = dataset.record(i)
        sample = builder(record, where, entry, random.Random(0))
        tiles = 0 if sample["pixel_values"] is None else len(sample["pixel_values"])
        assert builder.measure(record, where, entry) == (len(sample["input_ids"]), tiles), where


def test_lengths_are_cached_beside_the_data_and_remeasured_when_it_changes(tmp_path, builder):
    meta = make_colour_dataset(tmp_path / "data", num=4)
    calls = []

    def measure(record, where, entry):
        calls.append(where)
        return builder.measure(record, where, entry)

    def lengths(fingerprint="a"):
        dataset = RecordDataset(meta, builder, seed=0)
        return dataset_lengths(dataset, measure, settings_fingerprint=fingerprint, skip_bad=False, progress=False)

    first = lengths()
    assert len(calls) == 5 and list((tmp_path / "data" / ".internvl_tune_cache").glob("lengths-train.jsonl-*.json"))
    assert lengths() == first and len(calls) == 5  # read from the cache: nothing measured
    lengths(fingerprint="b")  # other settings or tokenizer: measured again
    assert len(calls) == 10
    annotation = tmp_path / "data" / "train.jsonl"
    annotation.write_text(annotation.read_text() + annotation.read_text().splitlines()[0] + "\n")  # one more line
    assert len(lengths()) == 6 and len(calls) == 16  # new bytes: the whole file measured again


def test_bad_records_stop_or_are_skipped(tmp_path, builder):
    (tmp_path / "images").mkdir()
    write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"image": "missing.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]},
        ],
    )
    meta = write_meta(
        tmp_path / "meta.json",
        {"d": {"root": str(tmp_path / "images"), "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1}},
    )
    dataset = RecordDataset(meta, builder, seed=0)
    with pytest.raises(DataError, match=r"train.jsonl:2: .*missing.png"):
        dataset_lengths(dataset, builder.measure, settings_fingerprint="x", skip_bad=False, progress=False)
    lengths = dataset_lengths(dataset, builder.measure, settings_fingerprint="x", skip_bad=True, progress=False)
    assert lengths[0] is not None and lengths[1] is None
    # The cache a skipping run wrote still refuses the bad record in a run that does not skip.
    with pytest.raises(DataError, match="missing.png"):
        dataset_lengths(dataset, builder.measure, settings_fingerprint="x", skip_bad=False, progress=False)
    cached = json.loads(next((tmp_path / ".internvl_tune_cache").glob("*.json")).read_text())
    assert isinstance(cached[1], str)
