"""What a resume runs with: the settings it is given (and records), or a one-line refusal for what it cannot change.

Regression tests: a resume with a new learning rate recorded 1e-3 in config.resolved.json and trained on the old
1e-5 cosine; a resume that changed what is trained ended in PyTorch's "loaded state dict contains a parameter group
that doesn't match"."""

import json
import math
from pathlib import Path

import pytest
from conftest import make_colour_dataset

from internvl_tune.cli import main
from internvl_tune.training.metrics import read_metrics
from internvl_tune.training.optim import lr_lambda

BASE = [
    "grad_checkpoint=false",
    "max_dynamic_patch=2",
    "max_seq_length=512",
    "per_device_train_batch_size=2",
    "warmup_ratio=0.0",
    "max_steps=6",
]


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("resume_settings")
    meta = make_colour_dataset(root / "data", num=5)
    path = root / "sft.yaml"
    path.write_text(f"model: {{model_name_or_path: {tiny_model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    return path


@pytest.fixture(scope="module")
def first_run(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first") / "run"
    assert main(["sft", "--config", str(config), *BASE, "learning_rate=1e-5", "save_steps=3", f"output_dir={out}"]) == 0
    return out


def _resume(config: Path, first_run: Path, out: Path, *overrides: str) -> int:
    resume = f"resume_from_checkpoint={first_run}/checkpoint-3"
    return main(["sft", "--config", str(config), *BASE, resume, f"output_dir={out}", *overrides])


def test_a_new_learning_rate_applies_from_the_resumed_step_and_is_recorded(config, first_run, tmp_path, caplog):
    out = tmp_path / "resumed"
    assert _resume(config, first_run, out, "learning_rate=1e-3") == 0
    rows = read_metrics(out / "metrics.jsonl")
    # The lr logged after step s is the schedule's value at s: the new peak on this run's cosine over 6 steps.
    expected = [1e-3 * lr_lambda(s, warmup_steps=0, total_steps=6, kind="cosine") for s in (4, 5, 6)]
    assert [r["step"] for r in rows] == [4, 5, 6]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-9)
    assert rows[0]["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))  # 2.5e-4, not 3.45e-6
    assert json.loads((out / "config.resolved.json").read_text())["train"]["learning_rate"] == 1e-3
    assert "train.learning_rate 1e-05 -> 0.001" in caplog.text

    # The same resume without changes continues the old run exactly.
    same = tmp_path / "same"
    assert _resume(config, first_run, same, "learning_rate=1e-5") == 0
    resumed, original = read_metrics(same / "metrics.jsonl"), read_metrics(first_run / "metrics.jsonl")[3:]
    for key in ("loss", "lr"):
        assert [r[key] for r in resumed] == pytest.approx([r[key] for r in original], abs=1e-6)


@pytest.mark.parametrize(
    "override, named",
    [("use_llm_lora=4", "model.use_llm_lora 0 -> 4"), ("freeze_backbone=true", "model.freeze_backbone False -> True")],
)
def test_changing_what_is_trained_on_resume_is_refused_in_one_line(
    config, first_run, tmp_path, capsys, override, named
):
    assert _resume(config, first_run, tmp_path / "changed", override) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {first_run}/checkpoint-3 trained other parameters ({named});")
