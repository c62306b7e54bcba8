"""Activation checkpointing on every transformers release the package accepts (>= 5.0)."""

import warnings

from torch import nn

from internvl_tune.config import ModelArgs
from internvl_tune.model.prepare import enable_activation_checkpointing, prepare_policy


def test_releases_before_5_23_have_only_gradient_checkpointing_enable():
    """transformers 5.0 - 5.22 have no `activation_checkpointing_enable`: calling it crashed every recipe there."""

    class Pre523Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.calls.append(gradient_checkpointing_kwargs)

        def enable_input_require_grads(self):
            self.calls.append("input grads")

    model = Pre523Model()
    enable_activation_checkpointing(model)
    assert model.calls == [{"use_reentrant": False}, "input grads"]


def test_the_installed_release_checkpoints_the_policy_without_deprecation_warnings(tiny_model_dir):
    for lora_rank in (0, 4):  # a PeftModel forwards the call to the model it wraps
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            model, _ = prepare_policy(
                ModelArgs(model_name_or_path=str(tiny_model_dir), grad_checkpoint=True, use_llm_lora=lora_rank)
            )
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
