import dataclasses
from pathlib import Path

import pytest
import yaml

from internvl_tune.config import (
    DataArgs,
    ModelArgs,
    MPOArgs,
    MPOConfig,
    RLArgs,
    RLConfig,
    SFTConfig,
    TrainArgs,
    field_docs,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sft").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sft_configs_load(path):
    config = load_config(SFTConfig, path)
    assert config.data.conv_style == "internvl2_5" and config.train.bf16
    assert path.read_text().startswith("#") and "Launch:" in path.read_text()


@pytest.mark.parametrize("cls", [ModelArgs, DataArgs, TrainArgs, MPOArgs, RLArgs])
def test_every_field_has_a_docstring_and_is_in_the_docs(cls):
    docs = field_docs(cls)
    reference = (ROOT / "docs" / "config.md").read_text()
    for f in dataclasses.fields(cls):
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        assert f"`{f.name}`" in reference, f"docs/config.md misses {f.name}"


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "mpo").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_mpo_configs_load(path):
    from internvl_tune.recipes.mpo import build_objective

    config = load_config(MPOConfig, path)
    objective = build_objective(config)
    assert objective.loss_types == ["sigmoid", "bco_pair", "sft"] and objective.loss_weights == [0.8, 0.2, 1.0]
    assert config.mpo.beta == 0.1 and config.train.weight_decay == 0.05 and config.train.num_train_epochs == 1


@pytest.mark.parametrize(
    "path",
    sorted(p for kind in ("sft", "mpo", "rl") for p in (ROOT / "configs" / kind).glob("*.yaml")),
    ids=lambda p: p.name,
)
def test_shipped_configs_save_resumable_checkpoints(path):
    """Every shipped run saves checkpoints to resume from (an MPO run without save_steps had none)."""
    train = yaml.safe_load(path.read_text())["train"]
    assert train["save_steps"] > 0 and train["save_total_limit"] >= 1


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "rl").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_rl_configs_take_the_official_online_stage(path):
    """InternVL3.5's online stage: GSPO, seq-mean-token-mean, clip 0.2 / 0.2, no KL, lr 1e-6 constant, ViT frozen, 12
    tiles, 16 responses, 512 prompts per step in updates of 32, 0.9 accuracy + 0.1 format."""
    config = load_config(RLConfig, path)
    rl, train = config.rl, config.train
    assert (rl.loss, rl.loss_agg_mode, rl.clip_ratio_low, rl.clip_ratio_high, rl.kl_coef) == (
        "gspo",
        "seq-mean-token-mean",
        0.2,
        0.2,
        0.0,
    )
    assert (rl.num_generations, rl.prompts_per_step, rl.mini_batch_size) == (16, 512, 32)
    assert rl.rewards == ["accuracy", "format"] and rl.reward_weights == [0.9, 0.1]
    assert train.learning_rate == 1e-6 and train.lr_scheduler_type == "constant" and train.warmup_ratio == 0
    assert config.model.freeze_backbone and config.data.max_dynamic_patch == 12
    assert "Launch:" in path.read_text()
