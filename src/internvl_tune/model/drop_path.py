"""Stochastic depth (DropPath) for the InternViT encoder, which transformers' InternVL does not have.

The original layer computes `x = x + DropPath(ls1 * attn(norm1(x)))` and `x = x + DropPath(ls2 * mlp(norm2(x)))`
with the rate rising linearly over the layers: `linspace(0, drop_path_rate, num_layers)`
(docs/original-differences.md §4.2).

transformers' `InternVLVisionLayer` applies `attention.projection_dropout` to the attention branch right before
`lambda_1 *` and `dropout` to the MLP branch right before `lambda_2 *`. DropPath scales a whole sample's branch
by 0 or 1/keep, which commutes with the per-channel layer scale, so putting a `DropPath` module in those two
slots gives exactly the original computation. This replaces submodules; it patches no code.
"""

from __future__ import annotations

import torch
from torch import nn

from internvl_tune.config import ConfigError


class DropPath(nn.Module):
    """Drops a residual branch for whole samples with probability `rate` in training; scales kept ones by 1/keep.

    Example: rate 0.25 on a batch of 4 keeps on average 3 samples' branch, each multiplied by 4/3.
    """

    def __init__(self, rate: float):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, C]
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def add_drop_path(model: nn.Module, drop_path_rate: float) -> None:
    """Install DropPath in every InternViT layer of `model` (an InternVLForConditionalGeneration)."""
    if drop_path_rate == 0.0:
        return
    layers = model.model.vision_tower.encoder.layer
    vision_config = model.config.vision_config
    if vision_config.hidden_dropout_prob or vision_config.projection_dropout:
        raise ConfigError("drop_path_rate cannot be combined with hidden_dropout_prob / projection_dropout in the ViT")
    rates = torch.linspace(0, drop_path_rate, len(layers)).tolist()
    for layer, rate in zip(layers, rates, strict=True):
        layer.attention.projection_dropout = DropPath(rate)
        layer.dropout = DropPath(rate)
