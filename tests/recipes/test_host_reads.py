"""The training step never reads a float tensor back to the host outside logging steps.

On a GPU such a read (`float(loss)`, `.item()`, `.tolist()`) waits for the device. Here, on CPU, every read of a
floating-point tensor made by internvl_tune code is recorded with the step it happens in; steps that do not log must
have none. (Integer tensors are collator data on the host: counting them is free.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import test_mpo
import test_sft
import torch

import internvl_tune.recipes.mpo as mpo_recipe
import internvl_tune.recipes.sft as sft_recipe

READS = ("item", "tolist", "__float__", "__int__", "__bool__")


@pytest.fixture
def host_reads(monkeypatch):
    """(reads, steps): reads made by internvl_tune code as (step, logging, where); each step and whether it logs."""
    reads: list[tuple[int, bool, str]] = []
    current = {"step": 0, "logging": True}  # set-up before the first step may read
    steps: list[tuple[int, bool]] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "internvl_tune" in caller and self.dtype.is_floating_point:
                where = f"{caller.rsplit('/', 1)[-1]}:{sys._getframe(1).f_lineno} {_name}"
                reads.append((current["step"], current["logging"], where))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for recipe in (sft_recipe, mpo_recipe):
        original_is_logging = recipe.is_logging_step

        def is_logging_step(step, t, total, _original=original_is_logging):
            current["step"], current["logging"] = step, _original(step, t, total)
            steps.append((step, current["logging"]))
            return current["logging"]

        monkeypatch.setattr(recipe, "is_logging_step", is_logging_step)
    return reads, steps


def _check(reads, steps):
    assert steps == [(1, False), (2, False), (3, True)]
    outside = [r for r in reads if not r[1]]
    assert not outside, f"host reads in steps that do not log: {outside}"
    assert any(r[1] and r[0] == 3 for r in reads)  # the logging step does read (the check sees reads)


def test_sft_step_reads_nothing_until_the_logging_step(host_reads, tmp_path, tiny_model_dir):
    meta = test_sft.make_colour_dataset(tmp_path / "data", num=8)
    code, _ = test_sft._run(tmp_path, tiny_model_dir, meta, "max_steps=3", "logging_steps=3")
    assert code == 0
    _check(*host_reads)


def test_mpo_step_reads_nothing_until_the_logging_step(host_reads, tmp_path, tiny_model_dir, meta):
    code, _ = test_mpo._run(tmp_path, tiny_model_dir, meta, "max_steps=3", "logging_steps=3")
    assert code == 0
    _check(*host_reads)


meta = test_mpo.meta  # the module-scoped preference data fixture


def test_both_recipes_log_the_same_common_metrics(tmp_path, tiny_model_dir, meta):
    """docs/metrics.md lists one set of names for both recipes; MPO adds its own on top."""
    from internvl_tune.training.metrics import read_metrics

    data = test_sft.make_colour_dataset(tmp_path / "data", num=4)
    assert test_sft._run(tmp_path, tiny_model_dir, data, "max_steps=1", name="sft")[0] == 0
    assert test_mpo._run(tmp_path, tiny_model_dir, meta, "max_steps=1", name="mpo")[0] == 0
    sft = read_metrics(tmp_path / "sft" / "metrics.jsonl")[0]
    mpo = read_metrics(tmp_path / "mpo" / "metrics.jsonl")[0]
    assert set(sft) <= set(mpo)
    documented = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    for name in mpo:
        assert f"`{name}`" in documented or name.startswith("loss/") or name.startswith(("rewards/", "logps/")), name
