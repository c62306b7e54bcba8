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
    sorted([*(ROOT / "configs" / "sft").glob("*.yaml"), *(ROOT / "configs" / "mpo").glob("*.yaml")]),
    ids=lambda p: p.name,
)
def test_shipped_configs_save_resumable_checkpoints(path):
    """Every shipped run saves checkpoints to resume from (an MPO run without save_steps had none)."""
    train = yaml.safe_load(path.read_text())["train"]
    assert train["save_steps"] > 0 and train["save_total_limit"] >= 1
