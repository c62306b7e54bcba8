"""Two CPU processes (DDP over gloo) give the same training as one process with the same global batch (SFT, MPO)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_colour_dataset, make_pair_dataset, write_rl_run

from internvl_tune.training.checkpoint import checkpoint_problem
from internvl_tune.training.metrics import read_metrics


def _launch(num_processes: int, config: Path, *overrides: str, command: str = "sft") -> str:
    """`internvl-tune COMMAND` under torchrun, its ranks pinned to the CPU (gloo): on a machine with one GPU, NCCL
    refuses two ranks on the same device, and both runs compared here must run on the same device."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env |= {"CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", str(num_processes), "-m", "internvl_tune.cli", command]
        + ["--config", str(config), *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_two_ranks_equal_one_rank(tmp_path, tiny_model_dir):
    meta = make_colour_dataset(tmp_path / "data", num=12)
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false}}\n"
        f"data: {{meta_path: {meta}, max_dynamic_patch: 4}}\n"
        "train: {max_steps: 4, learning_rate: 2.0e-3, warmup_ratio: 0.0, save_steps: 2}\n"
    )
    _launch(1, config, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=2")
    _launch(2, config, f"output_dir={tmp_path / 'two'}", "per_device_train_batch_size=1")
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(two) == 4  # only the main process writes metrics
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert [r["num_samples"] for r in two] == [2] * 4  # counted over both ranks
    # Both ranks wrote into the main process's temporary folder, renamed once whole.
    checkpoint = tmp_path / "two" / "checkpoint-2"
    assert checkpoint_problem(checkpoint) is None
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert not [p for p in (tmp_path / "two").iterdir() if p.name.startswith(".")]


def test_mpo_two_ranks_equal_one_rank_with_the_same_micro_batches(tmp_path, tiny_model_dir):
    """MPO with δ: 2 ranks x 1 pair x accumulation 2 against 1 rank x 2 pairs x accumulation 2.

    Both runs see the same pairs in the same micro-batches (rank r takes the r-th pair of each global micro-batch cut
    from the sampler's permutation), so all is equal: the step's pair and token counts are all-reduced, DDP's
    gradient mean times the world size is the sum, and δ folds each micro-batch's rank means (weight 1 per rank)
    exactly as it folds the one rank's mean over both pairs. 1 rank x 1 pair x accumulation 4 sees the same pairs
    per step but folds δ once per pair, a different δ sequence by design (tests/recipes/test_mpo.py,
    test_bco_pair_delta_is_folded_per_micro_batch), so it is not the run compared. Accumulation on both sides
    covers DDP's no_sync micro-batches. δ is compared itself: its effect on the loss cancels to first order (a run
    that skipped δ's all-reduce matched these losses and gradient norms and failed only on δ)."""
    meta = make_pair_dataset(tmp_path / "data", num=12)
    config = tmp_path / "mpo.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false, drop_path_rate: 0.0}}\n"
        f"data: {{meta_path: {meta}, max_dynamic_patch: 4}}\n"
        "train: {max_steps: 2, learning_rate: 5.0e-3, warmup_ratio: 0.0, gradient_accumulation_steps: 2}\n"
    )
    _launch(1, config, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=2", command="mpo")
    _launch(2, config, f"output_dir={tmp_path / 'two'}", "per_device_train_batch_size=1", command="mpo")
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(two) == len(one) == 2
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert [r["delta"] for r in two] == pytest.approx([r["delta"] for r in one], rel=1e-5)
    assert one[-1]["delta"] != 0.0  # the rewards moved: δ is compared for real


@pytest.mark.parametrize("command", ["sft", "mpo"])
def test_packed_two_ranks_equal_one_rank_with_accumulation_2(tmp_path, tiny_model_dir, command):
    """Packing on 2 ranks x 1 row == 1 rank x 1 row x accumulation 2: every rank plans the same global rows and takes
    its slice of each global batch, so each step trains on the same rows; the loss weights (square here) are
    normalised by the step's all-reduced sum. For MPO, δ folds one micro-batch per rank per step on 2 ranks but
    one per micro-batch on 1 rank, so the bco_pair term is left out of this comparison (sigmoid + sft)."""
    if command == "sft":
        meta = make_colour_dataset(tmp_path / "data", num=12)
        extra = ["loss_reduction=square"]
    else:
        meta = make_pair_dataset(tmp_path / "data", num=12)
        extra = ["sft_reduction=square", 'loss_type=["sigmoid","sft"]', "loss_weights=[1.0,1.0]", "drop_path_rate=0.0"]
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false}}\n"
        f"data: {{meta_path: {meta}, max_dynamic_patch: 4, packing: true, max_packed_tokens: 600}}\n"
        "train: {max_steps: 3, learning_rate: 2.0e-3, warmup_ratio: 0.0, per_device_train_batch_size: 1}\n"
    )
    _launch(1, config, f"output_dir={tmp_path / 'one'}", "gradient_accumulation_steps=2", *extra, command=command)
    _launch(2, config, f"output_dir={tmp_path / 'two'}", *extra, command=command)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(two) == len(one) == 3
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    assert [r["num_samples"] for r in two] == [r["num_samples"] for r in one]


def test_skipped_records_two_ranks_equal_one_rank_and_are_listed_once(tmp_path, tiny_model_dir):
    """9 records: one malformed (found before training), one truncated image (found only when rank r builds it),
    seven good. An epoch is the 8 usable records in global batches of 2 (the last partial on neither side here);
    both runs train the same samples, and each bad record is listed once, whichever rank read it."""
    import json

    from conftest import draw_image

    meta = make_colour_dataset(tmp_path / "data", num=6)
    images = tmp_path / "data" / "images"
    draw_image(images / "cut.png", (56, 56), "red")
    (images / "cut.png").write_bytes((images / "cut.png").read_bytes()[:120])  # the header reads, the pixels don't
    train = tmp_path / "data" / "train.jsonl"
    cut = {
        "image": "cut.png",
        "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "red"}],
    }
    train.write_text(train.read_text() + "{broken\n" + json.dumps(cut) + "\n")
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false}}\n"
        f"data: {{meta_path: {meta}, max_dynamic_patch: 4, on_bad_sample: skip}}\n"
        "train: {num_train_epochs: 1, learning_rate: 2.0e-3, warmup_ratio: 0.0, seed: 3}\n"
    )
    _launch(1, config, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=2")
    _launch(2, config, f"output_dir={tmp_path / 'two'}", "per_device_train_batch_size=1")
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(one) == len(two) == 4
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=1e-5)
    assert sum(r["num_samples"] for r in two) == sum(r["num_samples"] for r in one) == 7
    for run in ("one", "two"):
        summary = json.loads((tmp_path / run / "summary.json").read_text())
        assert sorted(where.rsplit(":", 1)[1] for where, _ in summary["skipped"]) == ["8", "9"], run


def test_two_ranks_measure_half_each_and_write_the_cache_once(tmp_path, tiny_model_dir):
    """Packed SFT on 2 ranks x 2 measuring workers: each rank measures half of the records (its log line), the
    gathered lengths are cached once, by rank 0, and equal those one process measures alone on a copy of the data
    (bad record included); both runs count the same steps over 2 epochs (the second epoch's rows counted on rank 1)
    and train the same losses."""
    import json
    import shutil

    import numpy as np

    meta = make_colour_dataset(tmp_path / "data", num=12)
    train = tmp_path / "data" / "train.jsonl"
    train.write_text(train.read_text() + "{broken\n")  # 14 records, line 14 bad
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false}}\n"
        "data: {max_dynamic_patch: 4, packing: true, max_packed_tokens: 600, on_bad_sample: skip}\n"
        "train: {num_train_epochs: 2, learning_rate: 2.0e-3, warmup_ratio: 0.0, per_device_train_batch_size: 1}\n"
    )
    two = _launch(2, config, f"meta_path={meta}", f"output_dir={tmp_path / 'two'}", "measure_workers=2")
    one = _launch(
        1,
        config,
        f"meta_path={tmp_path / 'copy' / 'meta.json'}",
        f"output_dir={tmp_path / 'one'}",
        "gradient_accumulation_steps=2",
        "measure_workers=0",
    )
    assert sorted(re.findall(r"measured (\d+) sample lengths .*rank (\d) of 2", two)) == [("7", "0"), ("7", "1")]
    assert len(re.findall(r"wrote the length cache", two)) == 1 and len(re.findall("wrote the length cache", one)) == 1
    (cached,) = (tmp_path / "data" / ".internvl_tune_cache").iterdir()  # one file, no temporary left
    (alone,) = (tmp_path / "copy" / ".internvl_tune_cache").iterdir()
    with np.load(cached) as merged, np.load(alone) as single:
        assert np.array_equal(merged["counts"], single["counts"]) and len(merged["counts"]) == 14
        assert list(json.loads(merged["messages"].tobytes())) == ["13"]
        assert merged["messages"].tobytes() == single["messages"].tobytes().replace(b"/copy/", b"/data/")
    metrics_one, metrics_two = (
        read_metrics(tmp_path / "one" / "metrics.jsonl"),
        read_metrics(tmp_path / "two" / "metrics.jsonl"),
    )
    assert len(metrics_two) == len(metrics_one) > 2
    assert [r["loss"] for r in metrics_two] == pytest.approx([r["loss"] for r in metrics_one], rel=1e-5)


def test_rl_two_ranks_equal_one_rank(tmp_path, tiny_model_dir, monkeypatch):
    """Online RL: 2 ranks x 1 prompt against 1 rank x 2 prompts per update (2 updates a step, so the second is
    off-policy). The ranks split each step's prompts, gather the rewards for the group advantages, and normalise each
    update over both ranks' responses: the same losses, ratios and gradient norms. `rl.rollout_batch_size` = G puts
    each prompt in a generate call of its own in both runs, so both sample the same responses (a batch is seeded by
    its requests' seeds and left-padded to its longest prompt)."""
    config = write_rl_run(tmp_path, tiny_model_dir, monkeypatch, "rollout_batch_size: 4, log_rollouts: true")
    _launch(1, config, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=2", command="rl")
    _launch(2, config, f"output_dir={tmp_path / 'two'}", "per_device_train_batch_size=1", command="rl")
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert len(two) == len(one) == 2
    assert [r["num_responses"] for r in two] == [16, 16]
    for key in ("reward/mean", "response_length/mean", "loss", "ratio_mean", "ratio_max", "clip_fraction"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=1e-5), key
    assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4)
    # The main rank logs both ranks' responses, in the order of the step's groups: the one-rank run's log.
    for step in (1, 2):
        name = f"step_{step:06d}.jsonl"
        logs = [[json.loads(line) for line in (tmp_path / run / "rollouts" / name).open()] for run in ("one", "two")]
        assert len(logs[1]) == 16 and len({r["prompt_index"] for r in logs[1]}) == 4
        assert [(r["prompt"], r["response"]) for r in logs[1]] == [(r["prompt"], r["response"]) for r in logs[0]]
        for key in ("reward", "advantage"):
            assert [r[key] for r in logs[1]] == pytest.approx([r[key] for r in logs[0]], abs=1e-9), key
