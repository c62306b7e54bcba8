"""Pinned numbers: 3 seeded steps of SFT and of MPO on the tiny model, compared to literals (rel 1e-4).

The equivalence tests compare two runs of the same code, so a change of the maths that moves both sides alike (a
normalisation, the label shift, the answer mask, a loss term, δ, the reference log-probs, the optimizer's update)
passes them. These literals catch it: the losses, the gradient norm before clipping (AdamW's first steps barely
depend on the gradient's scale, so the losses alone would miss a scaled gradient) and, for MPO, δ after each step.
MPO runs 1 pair x accumulation 2, so δ's per-micro-batch folding is pinned too.

They may change only with a deliberate, documented change of the maths (named in the commit message and in
docs/losses.md or the docs of the setting) or of what the run is built from (testing/tiny.py, the conftest data, a
default of the settings below). A refactor must leave them alone. To regenerate, run this file: a failing
assertion prints the observed values at full precision; paste them in, run it twice to check they are
deterministic, and say why they moved in the commit message.

The runs are pinned to the CPU (ACCELERATE_USE_CPU, SDPA), where the numbers were made: a GPU's kernels (TF32
convolutions, flex attention) round differently.
"""

import pytest
from conftest import make_colour_dataset, make_pair_dataset

from internvl_tune.cli import main
from internvl_tune.training.metrics import read_metrics

COMMON = [
    "attn_implementation=sdpa",
    "grad_checkpoint=false",
    "max_dynamic_patch=4",
    "max_seq_length=512",
    "warmup_ratio=0.0",
    "logging_steps=1",
    "seed=42",
    "max_steps=3",
]

SFT_PINNED = {
    "loss": [6.179161071777344, 6.1231842041015625, 6.113068580627441],
    "grad_norm": [7.906398296356201, 8.614001274108887, 4.331298828125],
}

MPO_PINNED = {
    "loss": [7.099887132644653, 6.85369348526001, 6.193324565887451],
    "grad_norm": [6.845069885253906, 8.546338081359863, 5.913605213165283],
    "delta": [0.0, -0.06295967241749167, -0.03059599393357833],  # 0 at step 1: policy == reference
}


@pytest.fixture(autouse=True)
def _on_cpu(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")


def _run(tmp_path, model_dir, command: str, meta, *overrides: str) -> dict[str, list[float]]:
    """The pinned metrics of each step of `internvl-tune COMMAND` with COMMON and `overrides`."""
    config = tmp_path / f"{command}.yaml"
    config.write_text(f"model: {{model_name_or_path: {model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    out = tmp_path / command
    assert main([command, "--config", str(config), *COMMON, *overrides, f"output_dir={out}"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    return {key: [row[key] for row in rows] for key in (MPO_PINNED if command == "mpo" else SFT_PINNED)}


def _assert_pinned(observed: dict[str, list[float]], pinned: dict[str, list[float]]) -> None:
    for key, values in pinned.items():
        assert observed[key] == pytest.approx(values, rel=1e-4), f"{key} moved; observed: {observed!r}"


def test_sft_losses_are_pinned(tmp_path, tiny_model_dir):
    meta = make_colour_dataset(tmp_path / "data", num=16)
    observed = _run(tmp_path, tiny_model_dir, "sft", meta, "per_device_train_batch_size=2", "learning_rate=2e-3")
    _assert_pinned(observed, SFT_PINNED)


def test_mpo_losses_and_delta_are_pinned(tmp_path, tiny_model_dir):
    meta = make_pair_dataset(tmp_path / "data", num=12)
    observed = _run(
        tmp_path,
        tiny_model_dir,
        "mpo",
        meta,
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=2",
        "learning_rate=5e-3",
        "drop_path_rate=0.0",
    )
    _assert_pinned(observed, MPO_PINNED)
