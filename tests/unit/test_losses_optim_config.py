import math
import re

import pytest
import torch

from internvl_tune.config import ConfigError, MPOConfig, SFTConfig, load_config
from internvl_tune.model.logprobs import label_gather, target_logps
from internvl_tune.training.optim import lr_lambda


def test_sft_nll_by_hand():
    """Vocab 2, logits [0, ln 3] at every position -> p(1) = 3/4, p(0) = 1/4.

    labels [-100, 1, 0]: position 0 predicts 1 (-ln 3/4), position 1 predicts 0 (-ln 1/4); sum = ln(16/3).
    """
    head = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0], [math.log(3)]]))  # hidden 1.0 -> logits [0, ln 3]
    index, targets, _ = label_gather(torch.tensor([[-100, 1, 0]]))
    assert index.tolist() == [0, 1] and targets.tolist() == [1, 0]
    nll = -target_logps(torch.ones(3, 1)[index], head, targets).sum()
    assert nll.item() == pytest.approx(math.log(16 / 3), rel=1e-6)


def test_lr_schedule_worked_example():
    values = [lr_lambda(s, warmup_steps=2, total_steps=10, kind="cosine") for s in (0, 1, 2, 6, 10)]
    assert values == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0], abs=1e-12)
    assert lr_lambda(6, warmup_steps=2, total_steps=10, kind="linear") == pytest.approx(0.5)
    assert lr_lambda(9, warmup_steps=2, total_steps=10, kind="constant") == 1.0


def _yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = _yaml(tmp_path, "model: {model_name_or_path: m}\ndata: {meta_path: d.json}\ntrain: {learning_rate: 1}\n")
    config = load_config(
        SFTConfig, path, ["train.bf16=true", "max_dynamic_patch=6", "learning_rate=1e-5", "system_message=null"]
    )
    assert config.train.learning_rate == 1e-5 and isinstance(config.train.learning_rate, float)
    assert config.train.bf16 is True and config.data.max_dynamic_patch == 6 and config.data.system_message is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.nope=1", "unknown field 'nope'"),
        ("max_dynamic_patch=six", "expected int"),
        ("normalize_type=foo", "must be one of"),
        ("bf16", "must look like key=value"),
        ("zzz=1", "unknown field"),
        ("min_dynamic_patch=20", "min_dynamic_patch <= max_dynamic_patch"),
        ("measure_workers=-2", "data.measure_workers must be >= 0"),
    ],
)
def test_config_errors(tmp_path, override, message):
    path = _yaml(tmp_path, "model: {model_name_or_path: m}\ndata: {meta_path: d.json}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(SFTConfig, path, [override])


def test_config_requires_model_and_data(tmp_path):
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        load_config(SFTConfig, _yaml(tmp_path, "data: {meta_path: d.json}\n"))
    with pytest.raises(ConfigError, match="unknown section 'dat'"):
        load_config(SFTConfig, _yaml(tmp_path, "dat: {meta_path: d.json}\n"))


@pytest.mark.parametrize(
    "config_class, overrides, message",
    [
        (SFTConfig, ["packing=true", "attn_implementation=flash_attention_2"], "or set data.packing=false"),
        (MPOConfig, ["attn_implementation=flash_attention_2"], "or set mpo.pair_layout=separate"),
    ],
)
def test_flash_attention_is_refused_for_rows_that_need_a_block_mask(tmp_path, config_class, overrides, message):
    """FlashAttention takes padding masks only: packed rows and shared-prefix pairs would lose their isolation."""
    path = _yaml(tmp_path, "model: {model_name_or_path: m}\ndata: {meta_path: d.json}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(config_class, path, overrides)
    allowed = ["attn_implementation=flash_attention_2"] + (
        ["pair_layout=separate"] if config_class is MPOConfig else []
    )
    assert load_config(config_class, path, allowed).model.attn_implementation == "flash_attention_2"
