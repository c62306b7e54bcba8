"""Activation checkpointing on every transformers release the package accepts (>= 5.0)."""

import warnings

import torch
from torch import nn

from internvl_tune.config import ModelArgs
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.model.prepare import enable_activation_checkpointing, prepare_policy


def test_releases_before_5_23_have_only_gradient_checkpointing_enable():
    """transformers 5.0 - 5.22 have no `activation_checkpointing_enable`: calling it crashed every recipe there."""

    class Pre523Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []
            self.embed = nn.Embedding(4, 2).requires_grad_(False)

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.calls.append(gradient_checkpointing_kwargs)

        def get_input_embeddings(self):
            return self.embed

        def disable_input_require_grads(self):
            self.calls.append("no input hooks")

    model = Pre523Model()
    enable_activation_checkpointing(model)
    assert model.calls == [{"use_reentrant": False}, "no input hooks"]
    assert model.embed(torch.tensor([1])).requires_grad  # the token embeddings' output joins the graph


def test_a_frozen_vit_runs_no_backward_under_checkpointing(tiny_model_dir):
    """transformers' `enable_input_require_grads` would hook the ViT's patch embeddings too, so a frozen ViT ran its
    whole backward; only the LLM's token embeddings are hooked. A trained ViT still gets its gradients."""
    for freeze in (True, False):
        model, tokenizer = prepare_policy(
            ModelArgs(model_name_or_path=str(tiny_model_dir), grad_checkpoint=True, freeze_backbone=freeze)
        )
        model.train()
        layer = model.model.vision_tower.encoder.layer[0]
        backward_calls = []
        layer.register_full_backward_hook(lambda m, grad_in, grad_out, calls=backward_calls: calls.append(1))
        image_token = model.config.image_token_id
        size, patch = model.config.vision_config.image_size[0], model.config.vision_config.patch_size[0]
        num_image_tokens = int((size // patch) ** 2 * model.config.downsample_ratio**2)
        ids = torch.tensor([[1] + [image_token] * num_image_tokens + [2, 3]])
        forward = InternVLTrainingForward(model)
        logits = forward(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            position_ids=torch.arange(ids.shape[1])[None],
            pixel_values=torch.randn(1, 3, size, size),
            image_flags=torch.tensor([True]),
        )
        logits.float().logsumexp(-1).mean().backward()
        vit_grads = [p.grad for p in model.model.vision_tower.parameters() if p.grad is not None]
        projector_grads = [p.grad for p in model.model.multi_modal_projector.parameters() if p.grad is not None]
        assert projector_grads  # the projector trains either way
        if freeze:
            assert backward_calls == [] and vit_grads == []
        else:
            assert backward_calls and vit_grads


def test_the_installed_release_checkpoints_the_policy_without_deprecation_warnings(tiny_model_dir):
    for lora_rank in (0, 4):  # a PeftModel forwards the call to the model it wraps
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            model, _ = prepare_policy(
                ModelArgs(model_name_or_path=str(tiny_model_dir), grad_checkpoint=True, use_llm_lora=lora_rank)
            )
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
