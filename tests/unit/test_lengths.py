"""Sample lengths for packing: measured without decoding pixels yet equal to the built samples, and cached by content."""

import json
import os
import random
import threading

import numpy as np
import pytest
from conftest import draw_image, make_colour_dataset, write_jsonl, write_meta

from internvl_tune.data import lengths as lengths_module
from internvl_tune.data import transform as transform_module
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.errors import DataError
from internvl_tune.data.lengths import SKIPPED, dataset_lengths, one_process
from internvl_tune.data.preference import PairBuilder
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
    assert len(calls) == 5 and list((tmp_path / "data" / ".internvl_tune_cache").glob("lengths-train.jsonl-*.npz"))
    assert np.array_equal(lengths(), first) and len(calls) == 5  # read from the cache: nothing measured
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
    problems = {}
    lengths = dataset_lengths(
        dataset, builder.measure, settings_fingerprint="x", skip_bad=True, progress=False, problems=problems
    )
    assert lengths[0, 0] > 0 and list(lengths[1]) == [SKIPPED, SKIPPED]
    assert list(problems) == [1] and "train.jsonl:2" in problems[1]
    # The cache a skipping run wrote still refuses the bad record in a run that does not skip.
    with pytest.raises(DataError, match="missing.png"):
        dataset_lengths(dataset, builder.measure, settings_fingerprint="x", skip_bad=False, progress=False)
    with np.load(next((tmp_path / ".internvl_tune_cache").glob("*.npz"))) as cached:
        assert list(cached["counts"][1]) == [SKIPPED, SKIPPED]
        assert "missing.png" in json.loads(cached["messages"].tobytes())["1"]


def _mixed_dataset(root):
    """Two files: colour images with a text record and two bad records (a missing image, a malformed line); a second
    file repeated 1.5 times. Returns the meta path."""
    meta = make_colour_dataset(root, num=9)
    bad_image = {
        "image": "missing.png",
        "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}],
    }
    lines = (root / "train.jsonl").read_text().splitlines()
    lines[3:3] = [json.dumps(bad_image), ""]  # line 4 bad, line 5 blank
    lines.insert(8, "{not json")  # line 9 malformed
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    write_jsonl(root / "more.jsonl", [json.loads(line) for line in lines if line.startswith('{"id"')])
    spec = json.loads(meta.read_text())["colours"]
    return write_meta(meta, {"colours": spec, "more": {**spec, "annotation": "more.jsonl", "repeat_time": 1.5}})


class _ThreadRanks:
    """`world` ranks as threads with an all-gather over a barrier: the merging of dataset_lengths without processes."""

    def __init__(self, world: int):
        self.world, self.slots, self.barrier = world, [None] * world, threading.Barrier(world)

    def gather(self, rank: int):
        def gather(value):
            self.slots[rank] = value
            self.barrier.wait()
            everyone = list(self.slots)
            self.barrier.wait()
            return everyone

        return gather

    def run(self, work):
        results = [None] * self.world

        def one(rank):
            try:
                results[rank] = work(rank, self.gather(rank))
            except DataError as e:
                results[rank] = e

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return results


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_and_ranks_measure_what_one_process_measures(tmp_path, builder, start_method, monkeypatch):
    """The same counts and bad-record messages (skip) with 1 process, a pool of 2 or 3 workers, and 2 or 3 ranks
    (threads) that each measure a share; the ranks write each file's cache once, from rank 0."""
    meta = _mixed_dataset(tmp_path / "data")
    dataset = RecordDataset(meta, builder, seed=0)

    def lengths(fingerprint, **kwargs):
        problems = {}
        counts = dataset_lengths(
            dataset,
            builder.measure,
            settings_fingerprint=fingerprint,
            skip_bad=True,
            progress=False,
            problems=problems,
            **kwargs,
        )
        return counts, problems

    one, one_problems = lengths("one")
    assert len(one) == len(dataset) and sorted(one_problems) == [3, 7]  # lines 4 and 9 of train.jsonl
    assert "train.jsonl:4" in one_problems[3] and "train.jsonl:9" in one_problems[7]
    for workers in (2, 3):
        counts, problems = lengths(f"workers{workers}", workers=workers, start_method=start_method)
        assert np.array_equal(counts, one) and problems == one_problems
    writes = []
    monkeypatch.setattr(lengths_module, "_write_cache", lambda paths, *a: writes.append(paths[0].name))
    for world in (2, 3):
        ranks = _ThreadRanks(world)
        results = ranks.run(lambda r, gather, w=world: lengths(f"ranks{w}", rank=r, world=w, gather=gather))
        for counts, problems in results:
            assert np.array_equal(counts, one) and problems == one_problems
    assert len(writes) == 4 and len(set(writes)) == 4  # 2 files x 2 runs, each written once


def test_a_bad_record_stops_every_rank_naming_the_first_in_file_order(tmp_path, builder):
    """Without skip: with a pool and with 2 ranks, every process raises the first bad record of the file (line 4, in
    rank 0's share) with its kind, as one process does; a bad record only in rank 1's share is named too."""
    meta = _mixed_dataset(tmp_path / "data")
    dataset = RecordDataset(meta, builder, seed=0)

    def lengths(rank=0, world=1, gather=one_process, workers=1):
        return dataset_lengths(
            dataset,
            builder.measure,
            settings_fingerprint="x",
            skip_bad=False,
            progress=False,
            workers=workers,
            rank=rank,
            world=world,
            gather=gather,
        )

    with pytest.raises(DataError, match=r"train.jsonl:4: .*missing.png") as one:
        lengths()
    with pytest.raises(DataError, match=r"train.jsonl:4: .*missing.png") as pooled:
        lengths(workers=2)
    assert pooled.value.kind == one.value.kind
    for error in _ThreadRanks(2).run(lambda r, gather: lengths(r, 2, gather)):
        assert isinstance(error, DataError) and "train.jsonl:4: " in str(error) and error.kind == one.value.kind
    # Only the malformed line 9 left: it is in rank 1's half of the file.
    lines = (tmp_path / "data" / "train.jsonl").read_text().splitlines()
    (tmp_path / "data" / "train.jsonl").write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    dataset = RecordDataset(meta, builder, seed=0)
    for error in _ThreadRanks(2).run(lambda r, gather: lengths(r, 2, gather)):
        assert isinstance(error, DataError) and "train.jsonl:8: malformed JSON" in str(error)


def test_a_cache_of_the_json_format_is_measured_again(tmp_path, builder):
    """Version 1 caches (a JSON list beside the data) are not read: their name differs, and the file is measured."""
    meta = make_colour_dataset(tmp_path / "data", num=3)
    cache = tmp_path / "data" / ".internvl_tune_cache"
    cache.mkdir()
    dataset = RecordDataset(meta, builder, seed=0)
    counts = dataset_lengths(dataset, builder.measure, settings_fingerprint="x", skip_bad=False, progress=False)
    (npz,) = cache.glob("*.npz")
    (cache / npz.name.replace(".npz", ".json")).write_text(json.dumps([[1, 1]] * len(counts)))  # a stale v1 file
    npz.unlink()
    again = dataset_lengths(dataset, builder.measure, settings_fingerprint="x", skip_bad=False, progress=False)
    assert np.array_equal(again, counts) and again[0, 0] != 1


def _built_length(sample) -> tuple[int, int]:
    """(tokens, tiles) of a built sample, or of a pair's row `[prompt | chosen | rejected]`."""
    keys = ("prompt_ids", "chosen_ids", "rejected_ids") if "prompt_ids" in sample else ("input_ids",)
    return sum(len(sample[k]) for k in keys), 0 if sample["pixel_values"] is None else len(sample["pixel_values"])


def test_measure_equals_the_built_sample_over_varied_records(tmp_path, tokenizer, monkeypatch):
    """Every kind of record the fast counting meets, measured == built (SFT tokens and tiles; a pair's shared row
    `[prompt | chosen | rejected]` and tiles): text-only, a record's own system turn, several turns, two images, one
    image named by many records (its size remembered, past the memo's bound), one file name with another size under
    another root (the memo keys by root), a video, a text cut to max_seq_length; and preference pairs of all these."""
    monkeypatch.setattr(transform_module, "IMAGE_SIZES_REMEMBERED", 3)
    for root, size in (("a", (224, 56)), ("b", (56, 112))):
        (tmp_path / root).mkdir()
        draw_image(tmp_path / root / "same.png", size, "red")
        for i, other in enumerate([(56, 56), (112, 56), (90, 70), (200, 60)]):
            draw_image(tmp_path / root / f"{i}.png", other, "blue")
        (tmp_path / root / "clip").mkdir()
        for i in range(3):
            draw_image(tmp_path / root / "clip" / f"frame_{i}.png", (56, 56), "green")
    long_answer = "one two three four five six seven " * 80
    turns = lambda *pairs: [{"from": r, "value": v} for r, v in pairs]  # noqa: E731
    sft = [
        {"conversations": turns(("human", "Hello!"), ("gpt", "Hi!"))},
        {"conversations": turns(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello"))},
        {"conversations": turns(("system", "Answer in French."), ("human", "Hi"), ("gpt", "Salut"))},
        {"conversations": turns(("human", "a"), ("gpt", "b"), ("human", "c?"), ("gpt", "d."))},
        {"image": ["same.png", "0.png"], "conversations": turns(("human", "<image>\nand <image>\n?"), ("gpt", "no"))},
        {"image": "same.png", "conversations": turns(("human", "Colour?"), ("gpt", "red"))},
        {"video": "clip", "conversations": turns(("human", "What happens?"), ("gpt", "nothing"))},
        {"conversations": turns(("human", "Count."), ("gpt", long_answer))},
    ] + [{"image": f"{i % 4}.png", "conversations": turns(("human", "Shape?"), ("gpt", "a ring"))} for i in range(9)]
    pairs = [
        {"question": "Hello!", "chosen": "Hi!", "rejected": "Go away."},
        {"image": "same.png", "question": "Colour?", "chosen": "red", "rejected": "It is blue."},
        {"image": ["same.png", "1.png"], "question": "<image> or <image>?", "chosen": "left", "rejected": "right"},
        {"video": "clip", "question": "What happens?", "chosen": "nothing", "rejected": "a dog runs by"},
        {"question": "Count.", "chosen": long_answer, "rejected": "no"},
    ] + [{"image": f"{i % 4}.png", "question": "Shape?", "chosen": "a ring", "rejected": "a box"} for i in range(9)]
    settings = SampleSettings(
        image_size=56, num_image_token=4, max_dynamic_patch=6, max_seq_length=400, min_num_frame=3, max_num_frame=3
    )
    for name, records, make in (("sft", sft, lambda b: b), ("pairs", pairs, PairBuilder)):
        write_jsonl(tmp_path / f"{name}.jsonl", records)
        spec = {"annotation": f"{name}.jsonl", "data_augment": False, "repeat_time": 1}
        meta = write_meta(tmp_path / f"{name}.json", {r: {**spec, "root": r} for r in ("a", "b")})
        builder = make(SampleBuilder(tokenizer, settings))
        sample_builder = builder if name == "sft" else builder.builder
        dataset = RecordDataset(meta, builder, seed=0, require_data_augment=name == "sft")
        truncated = 0
        for i in range(len(dataset)):
            record, where, entry = dataset.record(i)
            sample = builder(record, where, entry, random.Random(0))
            assert builder.measure(record, where, entry) == _built_length(sample), where
            truncated += sample["truncated"]
            assert len(sample_builder._image_sizes) <= 3
        assert truncated == 2, name  # the long answer, under both roots
    one = SampleBuilder(tokenizer, settings)
    a, b = (one.measure(sft[5], "x:1", dataset.entries[k]) for k in (0, 1))
    assert a[1] == 5 and b[1] == 3  # one builder, same.png: 4x1 + thumbnail under root a, 1x2 + thumbnail under b


@pytest.mark.parametrize("stop_early", [False, True])
def test_in_process_measuring_turns_tokenizer_threads_off_and_puts_the_setting_back(monkeypatch, stop_early):
    """One worker is one core: TOKENIZERS_PARALLELISM is "false" while the tasks run and the user's value after,
    also when the caller leaves the block before the last task (a bad record)."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    seen = []
    with lengths_module.span_results(
        lambda context, task: seen.append(os.environ["TOKENIZERS_PARALLELISM"]), None, [1, 2, 3], 1
    ) as results:
        for i, _ in enumerate(results):
            if stop_early and i == 0:
                break
    assert seen == ["false"] * (1 if stop_early else 3)
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
