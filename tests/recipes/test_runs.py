"""How runs start, stop and restart: output folders, whole checkpoints, Ctrl-C, epoch remainders, several runs in
one process. Through the CLI on the tiny model, as a user runs them."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from accelerate import Accelerator
from conftest import COLOURS, draw_image, make_colour_dataset, write_jsonl, write_meta

from internvl_tune.cli import main
from internvl_tune.config import SFTConfig, load_config
from internvl_tune.recipes import sft
from internvl_tune.training.metrics import MetricsWriter, read_metrics

BASE = [
    "grad_checkpoint=false",
    "max_dynamic_patch=4",
    "max_seq_length=512",
    "per_device_train_batch_size=2",
    "learning_rate=2e-3",
    "warmup_ratio=0.0",
]


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir) -> Path:
    """A run file for 6 samples (5 images and a text-only one)."""
    root = tmp_path_factory.mktemp("runs")
    meta = make_colour_dataset(root / "data", num=5)
    path = root / "sft.yaml"
    path.write_text(f"model: {{model_name_or_path: {tiny_model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    return path


def _sft(config: Path, out: Path, *overrides: str) -> int:
    return main(["sft", "--config", str(config), *BASE, f"output_dir={out}", *overrides])


def _rows(out: Path) -> list[dict]:
    return read_metrics(out / "metrics.jsonl")


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", ".")))


def test_epoch_remainder_is_a_last_smaller_step_and_resumes_exactly(tmp_path, config):
    """6 samples, batch 2 x accumulation 2: an epoch is 3 micro-batches, so steps of 2 and 1 (4 and 2 samples)."""
    out = tmp_path / "run"
    assert (
        _sft(config, out, "gradient_accumulation_steps=2", "num_train_epochs=2", "save_steps=1", "save_total_limit=0")
        == 0
    )
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["num_samples"] for r in rows] == [4, 2, 4, 2]
    assert [r["epoch"] for r in rows] == pytest.approx([2 / 3, 1.0, 5 / 3, 2.0])
    assert json.loads((out / "summary.json").read_text())["steps"] == 4

    # Resumed after the first step (a full one) and after the second (the remainder): the same losses follow.
    for step in (1, 2):
        resumed = tmp_path / f"resumed_{step}"
        args = (
            "gradient_accumulation_steps=2",
            "num_train_epochs=2",
            f"resume_from_checkpoint={out}/checkpoint-{step}",
        )
        assert _sft(config, resumed, *args) == 0
        assert [r["loss"] for r in _rows(resumed)] == pytest.approx([r["loss"] for r in rows[step:]], abs=1e-6)


def test_one_epoch_of_six_samples_ends_at_epoch_one(tmp_path, config):
    out = tmp_path / "run"
    assert _sft(config, out, "gradient_accumulation_steps=2") == 0
    assert [(r["step"], r["epoch"]) for r in _rows(out)] == [(1, pytest.approx(2 / 3)), (2, 1.0)]


def test_auto_resume_skips_incomplete_checkpoints_and_no_step_is_logged_twice(tmp_path, config, caplog):
    out = tmp_path / "run"
    assert _sft(config, out, "max_steps=4", "save_steps=1", "save_total_limit=0") == 0
    losses = [r["loss"] for r in _rows(out)]
    assert _checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # What a killed save of an older version, or a damaged disk, leaves: weights missing, an optimizer cut short,
    # and the temporary folder of a save that never finished.
    (out / "checkpoint-3" / "model.safetensors").unlink()
    optimizer = out / "checkpoint-2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    (out / ".checkpoint-4.tmp-999999").mkdir()
    (out / ".checkpoint-4.tmp-999999" / "optimizer.bin").write_bytes(b"")

    with caplog.at_level("INFO"):
        assert (
            _sft(config, out, "max_steps=4", "save_steps=1", "save_total_limit=0", "resume_from_checkpoint=auto") == 0
        )
    log = caplog.text
    assert "skipping incomplete checkpoint" in log and "checkpoint-3 (no model weights)" in log
    assert "checkpoint-2 (optimizer.bin is truncated)" in log
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in log
    assert not (out / ".checkpoint-4.tmp-999999").exists()
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rows 2-4 of the first run were dropped, then written again
    assert [r["loss"] for r in rows] == pytest.approx(losses, abs=1e-6)


def test_explicit_incomplete_checkpoint_is_a_one_line_error_before_the_model_loads(
    tmp_path, config, capsys, monkeypatch
):
    out = tmp_path / "run"
    assert _sft(config, out, "max_steps=2", "save_steps=1") == 0
    (out / "checkpoint-1" / "model.safetensors").unlink()
    capsys.readouterr()
    monkeypatch.setattr(sft, "prepare_policy", _must_not_load)
    assert _sft(config, tmp_path / "resumed", "max_steps=2", f"resume_from_checkpoint={out}/checkpoint-1") == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: train.resume_from_checkpoint: {out}/checkpoint-1 is not a whole checkpoint (no model weights)\n"
    )


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded")


def test_a_save_that_fails_leaves_no_checkpoint_and_the_next_run_may_change_precision(tmp_path, config, monkeypatch):
    """The save raises halfway (a full disk); afterwards there is no checkpoint-2 to resume from, no temporary
    folder, and accelerate's state is gone: a bf16 run in the same process starts."""
    real_save_state = Accelerator.save_state

    def save_half_then_fail(self, output_dir, **kwargs):
        real_save_state(self, output_dir, **kwargs)
        (Path(output_dir) / "optimizer.bin").write_bytes(b"cut")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", save_half_then_fail)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        sft.train(load_config(SFTConfig, config, [*BASE, f"output_dir={out}", "max_steps=3", "save_steps=2"]))
    assert _checkpoints(out) == []
    monkeypatch.undo()

    assert _sft(config, tmp_path / "bf16", "max_steps=1", "bf16=true") == 0


def test_a_run_that_errors_leaves_no_global_state(tmp_path, tiny_model_dir, config, capsys):
    """A data error mid-run, then a run with another precision in the same process."""
    root = tmp_path / "bad"
    meta = make_colour_dataset(root, num=5, extra_records=['{"id": "cut", '] * 6)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {{model_name_or_path: {tiny_model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    assert _sft(bad, tmp_path / "fails", "max_steps=6", "shuffle=false") == 2
    assert "malformed JSON line" in capsys.readouterr().err
    assert _sft(config, tmp_path / "bf16", "max_steps=1", "bf16=true") == 0


def test_an_output_folder_of_another_run_is_refused_unless_resumed_or_overwritten(
    tmp_path, config, capsys, monkeypatch
):
    out = tmp_path / "run"
    assert _sft(config, out, "max_steps=3", "save_steps=1") == 0
    (out / "reference_logps.pt").write_bytes(b"not the run's")  # e.g. from precompute-ref: kept
    capsys.readouterr()

    with monkeypatch.context() as patch:
        patch.setattr(sft, "prepare_policy", _must_not_load)
        assert _sft(config, out, "max_steps=2") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} holds another run (checkpoint-1, checkpoint-2, config.resolved.json, ")
    assert "train.resume_from_checkpoint=auto" in err and "train.overwrite_output_dir=true" in err
    assert err.count("\n") == 1

    assert _sft(config, out, "max_steps=2", "overwrite_output_dir=true") == 0
    assert [r["step"] for r in _rows(out)] == [1, 2]
    assert _checkpoints(out) == []  # the old run's checkpoints are gone: a later auto resume cannot pick them
    assert (out / "reference_logps.pt").read_bytes() == b"not the run's"

    assert _sft(config, out, "overwrite_output_dir=true", "resume_from_checkpoint=auto") == 2
    assert "overwrite_output_dir deletes what train.resume_from_checkpoint would resume" in capsys.readouterr().err


def test_a_folder_without_a_run_is_used(tmp_path, config):
    out = tmp_path / "run"
    out.mkdir()
    (out / "reference_logps.pt").write_bytes(b"cache")
    assert _sft(config, out, "max_steps=1") == 0


# The run's process, with step 1's metrics line followed by a wait for the file named first: the test sends the
# signal while step 1 is ending, so the run has no step to race through before the signal lands.
_WAIT_AFTER_STEP_1 = """
import sys, time
from pathlib import Path
from internvl_tune.cli import main
from internvl_tune.training.metrics import MetricsWriter

go, write = Path(sys.argv[1]), MetricsWriter.write

def write_then_wait(self, step, values):
    write(self, step, values)
    while not go.exists():
        time.sleep(0.01)

MetricsWriter.write = write_then_wait
sys.exit(main(sys.argv[2:]))
"""


def test_ctrl_c_saves_a_checkpoint_and_exits_with_one_line_then_auto_resume_finishes(tmp_path, config):
    """Ctrl-C after the first step (SIGINT to the process group, data loader workers included): the run saves at
    the next step boundary and exits 130 with one line; a resume with auto trains to the end, and each step appears
    once in metrics.jsonl. The run waits after step 1's metrics until the test has seen it take the signal, so it
    always stops at step 1 (a fast run used to finish all 6 steps before the signal arrived)."""
    out, go = tmp_path / "run", tmp_path / "go"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    argv = ["sft", "--config", str(config), *BASE, f"output_dir={out}", "max_steps=6", "dataloader_num_workers=1"]
    run = subprocess.Popen(
        [sys.executable, "-c", _WAIT_AFTER_STEP_1, str(go), *argv],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    lines, taken = [], threading.Event()

    def read_stderr():
        for line in run.stderr:
            lines.append(line)
            if "SIGINT: stopping after this step" in line:
                taken.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 600  # only turns a hang into a failure
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert run.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)
        assert taken.wait(timeout=600), "".join(lines)[-3000:]
        go.touch()
        run.wait(timeout=600)
        reader.join(timeout=60)
    finally:
        run.kill()
    err = "".join(lines)
    assert run.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.count("SIGINT: stopping after this step") == 1  # workers ignore it
    last = err.strip().splitlines()[-1]
    assert last == f"interrupted at step 1: saved {out}/checkpoint-1; resume with train.resume_from_checkpoint=auto"
    assert len(_rows(out)) == 1 and not (out / "final").exists()

    assert _sft(config, out, "max_steps=6", "dataloader_num_workers=1", "resume_from_checkpoint=auto") == 0
    assert [r["step"] for r in _rows(out)] == list(range(1, 7))
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_mpo_stops_on_a_signal_at_a_step_boundary_and_resumes_exactly_into_its_remainder(
    tmp_path, tiny_model_dir, capsys, monkeypatch
):
    """MPO uses the same stop and remainder code: 6 pairs at batch 2 x accumulation 2 are a step of 4 pairs and
    one of 2; SIGINT during step 1 saves checkpoint-1, and the resumed run's step 2 equals the uninterrupted one."""
    root = tmp_path / "pairs"
    (root / "images").mkdir(parents=True)
    colours = list(COLOURS)
    records = []
    for i in range(6):
        draw_image(root / "images" / f"{i}.png", (56, 56), colours[i % 3])
        records.append(
            {"image": f"{i}.png", "question": "Colour?", "chosen": colours[i % 3], "rejected": colours[(i + 1) % 3]}
        )
    write_jsonl(root / "pairs.jsonl", records)
    meta = write_meta(root / "meta.json", {"pairs": {"root": "images", "annotation": "pairs.jsonl"}})
    config = tmp_path / "mpo.yaml"
    config.write_text(f"model: {{model_name_or_path: {tiny_model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    args = ["mpo", "--config", str(config), *BASE, "drop_path_rate=0", "gradient_accumulation_steps=2"]

    assert main([*args, f"output_dir={tmp_path / 'whole'}"]) == 0
    whole = _rows(tmp_path / "whole")
    assert [(r["num_samples"], r["epoch"]) for r in whole] == [(4, pytest.approx(2 / 3)), (2, 1.0)]

    write = MetricsWriter.write

    def write_then_signal(self, step, values):
        write(self, step, values)
        os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C while step 1 finishes

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(MetricsWriter, "write", write_then_signal)
        assert main([*args, f"output_dir={out}"]) == 130
    assert capsys.readouterr().err.endswith(
        f"interrupted at step 1: saved {out}/checkpoint-1; resume with train.resume_from_checkpoint=auto\n"
    )
    assert main([*args, f"output_dir={out}", "resume_from_checkpoint=auto"]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("loss", "delta", "rewards/margins"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in whole], abs=1e-6), key
