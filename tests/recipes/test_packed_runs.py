"""Packing through the recipes: packed == padded training for every loss reduction (SFT and pairs), accumulation of
packed micro-batches == one bigger packed micro-batch, exact resume of a packed run, and the over-budget policy.

Tolerances: fp32 on CPU; a packed row runs attention per sample (or with a dense block mask) where the padded batch
uses a padding mask, so sums are taken in another order: losses agree to rel 1e-5, gradient norms to rel 1e-4."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_colour_dataset, make_pair_dataset

from internvl_tune.cli import main
from internvl_tune.training.metrics import read_metrics

BASE = [
    "grad_checkpoint=false",
    "max_dynamic_patch=4",
    "max_seq_length=512",
    "learning_rate=2e-3",
    "warmup_ratio=0.0",
    "logging_steps=1",
    "drop_path_rate=0.0",
]
LONG_ANSWERS = [
    {
        "id": f"long{i}",
        "image": f"{i}.png",
        "conversations": [
            {"from": "human", "value": "Describe the picture."},
            {"from": "gpt", "value": " ".join(["a shape of one colour on white"] * (i + 1))},
        ],
    }
    for i in range(4)
]


@pytest.fixture(scope="module")
def sft_meta(tmp_path_factory) -> Path:
    # 16 one-word answers about 1 to 5 tiles, 4 longer answers, 1 text-only record: 21 samples of varied lengths.
    return make_colour_dataset(tmp_path_factory.mktemp("data"), num=16, extra_records=LONG_ANSWERS)


@pytest.fixture(scope="module")
def pair_meta(tmp_path_factory) -> Path:
    return make_pair_dataset(tmp_path_factory.mktemp("pairs"), num=12)


def _run(tmp_path, model_dir, meta, command, name, *overrides) -> tuple[int, list[dict]]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(f"model: {{model_name_or_path: {model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    out = tmp_path / name
    code = main([command, "--config", str(config), *BASE, f"output_dir={out}", *overrides])
    rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    return code, rows


def _assert_same_training(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)
    assert [r["num_samples"] for r in a] == [r["num_samples"] for r in b]


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_sft_packed_equals_padded(tmp_path, tiny_model_dir, sft_meta, reduction):
    """Every sample in each of 2 steps (2 epochs of one step): padded as 21 rows, or packed into a few rows of
    600 tokens. The same loss and gradient every step means the same update."""
    common = ["max_steps=2", f"loss_reduction={reduction}", "per_device_train_batch_size=21"]
    code, padded = _run(tmp_path, tiny_model_dir, sft_meta, "sft", "padded", *common)
    assert code == 0
    code, packed = _run(
        tmp_path, tiny_model_dir, sft_meta, "sft", "packed", *common, "packing=true", "max_packed_tokens=600"
    )
    assert code == 0
    _assert_same_training(padded, packed)
    assert packed[0]["num_samples"] == 21
    assert packed[0]["padding_share"] < padded[0]["padding_share"]
    if reduction == "square":
        # The CPU default runs packed rows per segment (also under gradient checkpointing); the dense block mask
        # (`sdpa`) trains the same.
        for name, extra in (("checkpointed", "grad_checkpoint=true"), ("dense", "attn_implementation=sdpa")):
            code, other = _run(
                tmp_path, tiny_model_dir, sft_meta, "sft", name, *common, "packing=true", "max_packed_tokens=600", extra
            )
            assert code == 0
            _assert_same_training(other, packed)


def test_sft_reductions_train_differently(tmp_path, tiny_model_dir, sft_meta):
    """The reduction reaches the loss: token, sample and square give three different first losses."""
    losses = []
    for reduction in ("token", "sample", "square"):
        code, rows = _run(
            tmp_path,
            tiny_model_dir,
            sft_meta,
            "sft",
            reduction,
            "max_steps=1",
            "per_device_train_batch_size=21",
            f"loss_reduction={reduction}",
        )
        assert code == 0
        losses.append(rows[0]["loss"])
    assert len({round(v, 6) for v in losses}) == 3


def test_packed_accumulation_equals_one_bigger_micro_batch(tmp_path, tiny_model_dir, sft_meta):
    """1 packed row per micro-batch x accumulation 3 == 3 rows in one micro-batch (the same rows per step)."""
    packed = ["packing=true", "max_packed_tokens=600", "max_steps=3", "loss_reduction=square"]
    code, accumulated = _run(
        tmp_path,
        tiny_model_dir,
        sft_meta,
        "sft",
        "acc",
        *packed,
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=3",
    )
    assert code == 0
    code, whole = _run(tmp_path, tiny_model_dir, sft_meta, "sft", "whole", *packed, "per_device_train_batch_size=3")
    assert code == 0
    _assert_same_training(accumulated, whole)


def test_packed_run_resumes_exactly(tmp_path, tiny_model_dir, sft_meta):
    """Stopped at step 3 and resumed: steps 4-6 train on the rows, and give the losses, of the run that went on."""
    packed = ["packing=true", "max_packed_tokens=600", "per_device_train_batch_size=1", "max_steps=6"]
    code, straight = _run(tmp_path, tiny_model_dir, sft_meta, "sft", "straight", *packed, "save_steps=3")
    assert code == 0
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert checkpoint.is_dir()
    code, resumed = _run(
        tmp_path, tiny_model_dir, sft_meta, "sft", "resumed", *packed, f"resume_from_checkpoint={checkpoint}"
    )
    assert code == 0
    assert [r["step"] for r in resumed] == [4, 5, 6]
    _assert_same_training(straight[3:], resumed)


def test_a_resume_on_changed_data_or_budgets_is_refused(tmp_path, tiny_model_dir, sft_meta, capsys):
    """A packed run's position means its rows only on the same lengths and budgets: a resume after either changed
    is one error line naming the change, unless train.resume_data_check=false."""
    packed = ["packing=true", "max_packed_tokens=600", "per_device_train_batch_size=1", "max_steps=3"]
    code, _ = _run(tmp_path, tiny_model_dir, sft_meta, "sft", "first", *packed, "save_steps=2")
    checkpoint = tmp_path / "first" / "checkpoint-2"
    assert code == 0 and checkpoint.is_dir()
    capsys.readouterr()

    # One answer made longer: the same records, other lengths.
    data = tmp_path / "edited"
    shutil.copytree(sft_meta.parent, data, ignore=shutil.ignore_patterns(".internvl_tune_cache"))
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"gpt", "value": "', '"gpt", "value": "a long answer now: ', 1)
    assert lines[0] != (sft_meta.parent / "train.jsonl").read_text().splitlines()[0]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    resume = f"resume_from_checkpoint={checkpoint}"
    for meta, extra, change in (
        (data / "meta.json", [], "sample lengths changed"),
        (sft_meta, ["max_packed_tokens=700"], "max_packed_tokens 600 -> 700"),
    ):
        code, rows = _run(tmp_path, tiny_model_dir, meta, "sft", "again", *packed, *extra, resume)
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert code == 2 and rows == [], errors
        assert len(errors) == 1 and change in errors[0] and "resume_data_check=false" in errors[0]
        shutil.rmtree(tmp_path / "again", ignore_errors=True)
    code, rows = _run(
        tmp_path, tiny_model_dir, data / "meta.json", "sft", "again", *packed, resume, "resume_data_check=false"
    )
    assert code == 0 and [r["step"] for r in rows] == [3]


def test_over_budget_samples_are_refused_or_trained_alone(tmp_path, tiny_model_dir, sft_meta, capsys):
    packed = ["packing=true", "max_packed_tokens=200", "per_device_train_batch_size=2", "max_steps=1"]
    code, _ = _run(tmp_path, tiny_model_dir, sft_meta, "sft", "refused", *packed)
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "train.jsonl:" in errors[0] and "oversize_sample=alone" in errors[0]
    assert "Traceback" not in capsys.readouterr().err
    code, rows = _run(tmp_path, tiny_model_dir, sft_meta, "sft", "alone", *packed, "oversize_sample=alone")
    assert code == 0 and rows[0]["num_samples"] >= 1


@pytest.mark.parametrize("reduction", ["token", "square"])
def test_mpo_packed_pairs_equal_one_pair_per_row(tmp_path, tiny_model_dir, pair_meta, reduction):
    """All 12 pairs in one step: one pair per row, or several [prompt | chosen | rejected] groups per row. Pair and
    chosen-token denominators are the step's, so loss, gradient and δ agree."""
    common = ["max_steps=2", "per_device_train_batch_size=12", f"sft_reduction={reduction}"]
    code, rows = _run(tmp_path, tiny_model_dir, pair_meta, "mpo", "rows", *common)
    assert code == 0
    code, packed = _run(
        tmp_path, tiny_model_dir, pair_meta, "mpo", "packed", *common, "packing=true", "max_packed_tokens=600"
    )
    assert code == 0
    _assert_same_training(rows, packed)
    assert [r["delta"] for r in packed] == pytest.approx([r["delta"] for r in rows], rel=1e-5)


@pytest.mark.parametrize("command", ["sft", "mpo"])
def test_length_grouped_epoch_trains_every_full_batch(tmp_path, tiny_model_dir, sft_meta, pair_meta, command):
    """group_by_length: one epoch of batches of 4 trains the same number of samples as random batches (the last
    partial batch left out of both), with less padding."""
    meta = sft_meta if command == "sft" else pair_meta
    common = ["num_train_epochs=1", "per_device_train_batch_size=4", "max_steps=-1"]
    code, grouped = _run(tmp_path, tiny_model_dir, meta, command, "grouped", *common, "group_by_length=true")
    assert code == 0
    code, plain = _run(tmp_path, tiny_model_dir, meta, command, "plain", *common)
    assert code == 0
    assert sum(r["num_samples"] for r in grouped) == sum(r["num_samples"] for r in plain) > 0
    padding = lambda rows: sum(r["padding_share"] for r in rows)  # noqa: E731
    assert padding(grouped) <= padding(plain)


def test_sft_v2pe_packed_equals_padded_and_records_its_stride(tmp_path, tiny_model_dir, sft_meta):
    """V2PE random (strides drawn per image from 1, 2, 4 with each sample's seed): packed rows keep each sample's
    positions, so packed and padded train alike; they train otherwise than plain positions, and final/ records the
    mode and the stride chat and eval use."""
    common = ["max_steps=2", "per_device_train_batch_size=21", "v2pe=random", "v2pe_stride=2"]
    code, padded = _run(tmp_path, tiny_model_dir, sft_meta, "sft", "padded", *common)
    assert code == 0
    code, packed = _run(
        tmp_path, tiny_model_dir, sft_meta, "sft", "packed", *common, "packing=true", "max_packed_tokens=600"
    )
    assert code == 0
    _assert_same_training(padded, packed)
    code, plain = _run(tmp_path, tiny_model_dir, sft_meta, "sft", "plain", *common[:2])
    assert code == 0
    assert padded[1]["loss"] != pytest.approx(plain[1]["loss"], rel=1e-5)
    metadata = json.loads((tmp_path / "packed" / "final" / "internvl_tune.json").read_text())
    assert metadata["v2pe"] == {"mode": "random", "stride": 2}
