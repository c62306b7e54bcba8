"""Output folders a user can reuse, hints that lead somewhere, and errors that say what the data should be."""

import json
from pathlib import Path

import pytest
from conftest import make_colour_dataset

from internvl_tune.cli import main
from internvl_tune.training.metrics import read_metrics

BASE = ["grad_checkpoint=false", "max_dynamic_patch=2", "max_seq_length=512", "per_device_train_batch_size=2"]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("run_folders") / "data", num=3)


def _run(tmp_path: Path, model_dir: Path, meta: Path, out: Path, *overrides: str, command: str = "sft") -> int:
    config = tmp_path / f"{command}.yaml"
    config.write_text(f"model: {{model_name_or_path: {model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    return main([command, "--config", str(config), *BASE, f"output_dir={out}", *overrides])


def test_a_run_that_failed_before_its_first_step_leaves_a_reusable_folder(tmp_path, tiny_model_dir, meta, capsys):
    out = tmp_path / "run"
    # Fails after config.resolved.json is written, before any step: a data error found while building.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text(
        '{"image": "missing.png", "conversations": [{"from": "human", "value": '
        '"<image>\\nx"}, {"from": "gpt", "value": "y"}]}\n'
    )
    (broken / "meta.json").write_text(
        json.dumps({"d": {"root": "", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1}})
    )
    assert _run(tmp_path, tiny_model_dir, broken / "meta.json", out, "max_steps=1") == 2
    assert "missing.png" in capsys.readouterr().err
    assert (out / "config.resolved.json").is_file() and not list(out.glob("checkpoint-*"))

    # The re-run on fixed data is not refused as "holds another run".
    assert _run(tmp_path, tiny_model_dir, meta, out, "max_steps=1") == 0
    assert [row["step"] for row in read_metrics(out / "metrics.jsonl")] == [1]


def test_a_finished_run_without_checkpoints_is_not_offered_a_resume(tmp_path, tiny_model_dir, meta, capsys):
    out = tmp_path / "run"
    assert _run(tmp_path, tiny_model_dir, meta, out, "max_steps=1") == 0
    capsys.readouterr()
    assert _run(tmp_path, tiny_model_dir, meta, out, "max_steps=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {out} holds another run (") and "overwrite_output_dir=true" in err
    assert "resume_from_checkpoint" not in err
    # auto with nothing to resume would train the finished run again from step 0: refused too.
    assert _run(tmp_path, tiny_model_dir, meta, out, "max_steps=1", "resume_from_checkpoint=auto") == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


def test_mpo_on_sft_data_says_what_a_preference_record_needs(tmp_path, tiny_model_dir, meta, capsys):
    assert _run(tmp_path, tiny_model_dir, meta, tmp_path / "mpo", "max_steps=1", command="mpo") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "looks like an SFT record ('conversations'), not a preference pair" in err
    assert "'question', 'chosen', 'rejected'" in err and "train.jsonl:" in err


@pytest.mark.parametrize("steps", ["0", "-2"])
def test_max_steps_zero_is_refused_not_read_as_use_epochs(tmp_path, tiny_model_dir, meta, capsys, steps):
    assert _run(tmp_path, tiny_model_dir, meta, tmp_path / "run", f"max_steps={steps}") == 2
    assert f"error: train.max_steps={steps}: set the number of optimizer steps (> 0), or -1" in capsys.readouterr().err
