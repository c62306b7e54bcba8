"""What an epoch is: one pass over the good records, each trained once, each bad one counted once, none dropped.

Regression tests for runs that silently trained other data than asked: bad records refilled from later epochs (the
good ones trained several times, the bad ones counted several times), and the last partial micro-batch of an epoch
dropped.
"""

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import make_pair_dataset, write_jsonl, write_meta

from internvl_tune.cli import main
from internvl_tune.training.metrics import read_metrics

BASE = [
    "grad_checkpoint=false",
    "max_dynamic_patch=2",
    "max_seq_length=256",
    "learning_rate=1e-3",
    "warmup_ratio=0.0",
    "logging_steps=1",
]


def _text_records(num: int) -> list[dict]:
    return [
        {"id": i, "conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}"}]}
        for i in range(num)
    ]


def _dataset(root: Path, records: list) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "train.jsonl", records)
    return write_meta(
        root / "meta.json", {"d": {"root": "", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1}}
    )


def _run(tmp_path, model_dir, meta, *overrides, command="sft", name="run") -> tuple[int, Path]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"model: {{model_name_or_path: {model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    out = tmp_path / name
    return main([command, "--config", str(config), *BASE, f"output_dir={out}", *overrides]), out


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _bad_lines(summary: dict) -> Counter:
    return Counter(int(where.rsplit(":", 1)[1]) for where, _ in summary["skipped"])


# 10 records, the good ones on lines 3 and 7, the other 8 malformed.
GOOD_LINES = (3, 7)


@pytest.fixture
def mostly_bad(tmp_path) -> Path:
    good = iter(_text_records(2))
    return _dataset(tmp_path / "data", [next(good) if line in GOOD_LINES else "{broken" for line in range(1, 11)])


def test_skipping_bad_records_trains_each_good_one_once_per_epoch(tmp_path, tiny_model_dir, mostly_bad):
    code, out = _run(
        tmp_path,
        tiny_model_dir,
        mostly_bad,
        "on_bad_sample=skip",
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=1",
        "num_train_epochs=1",
    )
    assert code == 0
    summary = _summary(out)
    # Two good records, batch 1: 2 steps (was 10 steps, the good ones trained 5 times each).
    assert summary["steps"] == 2
    assert sum(row["num_samples"] for row in read_metrics(out / "metrics.jsonl")) == 2
    # Every bad line counted and listed once (was 40).
    assert summary["num_skipped"] == 8
    assert _bad_lines(summary) == Counter(line for line in range(1, 11) if line not in GOOD_LINES)


def test_bad_records_are_counted_once_in_each_epoch_with_accumulation(tmp_path, tiny_model_dir, mostly_bad):
    code, out = _run(
        tmp_path,
        tiny_model_dir,
        mostly_bad,
        "on_bad_sample=skip",
        "per_device_train_batch_size=4",
        "gradient_accumulation_steps=4",
        "num_train_epochs=2",
    )
    assert code == 0
    summary = _summary(out)
    assert summary["steps"] == 2  # one step per epoch: its one micro-batch holds both good records
    assert [row["num_samples"] for row in read_metrics(out / "metrics.jsonl")] == [2, 2]
    assert summary["num_skipped"] == 16  # was 6, two bad lines never listed
    assert _bad_lines(summary) == Counter({line: 2 for line in range(1, 11) if line not in GOOD_LINES})


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_last_partial_micro_batch_of_an_epoch_is_trained(tmp_path, tiny_model_dir, packing):
    meta = _dataset(tmp_path / "data", _text_records(10))
    overrides = ["per_device_train_batch_size=4", "gradient_accumulation_steps=1", "num_train_epochs=1"]
    if packing:
        # Rows of a few samples each (a tiny text sample is a few dozen tokens), 4 rows per micro-batch.
        overrides += ["packing=true", "max_packed_tokens=256"]
    code, out = _run(tmp_path, tiny_model_dir, meta, *overrides)
    assert code == 0
    samples = [row["num_samples"] for row in read_metrics(out / "metrics.jsonl")]
    assert sum(samples) == 10  # was 8: the last 2 samples were dropped
    if not packing:
        assert samples == [4, 4, 2] and _summary(out)["steps"] == 3


def test_mpo_skips_a_bad_pair_without_refilling(tmp_path, tiny_model_dir):
    meta = make_pair_dataset(tmp_path / "pairs", num=3)
    pairs = meta.parent / "pairs.jsonl"
    pairs.write_text(pairs.read_text() + "{broken\n")  # 4 pairs, the last one bad
    code, out = _run(
        tmp_path,
        tiny_model_dir,
        meta,
        "on_bad_sample=skip",
        "per_device_train_batch_size=1",
        "num_train_epochs=1",
        "drop_path_rate=0.0",
        command="mpo",
    )
    assert code == 0
    summary = _summary(out)
    assert summary["steps"] == 3  # was 4: the bad pair's step refilled from the next epoch
    assert summary["num_skipped"] == 1 and _bad_lines(summary) == Counter({4: 1})
