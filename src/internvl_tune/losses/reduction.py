"""How the per-token NLL of an SFT loss (or of MPO's SFT term) is averaged: `token`, `sample` or `square`.

Each sample s with n_s supervised tokens gets a weight w(n_s) on each of its tokens, and the loss of an optimizer step
is the weighted token mean over the WHOLE step (every micro-batch of the accumulation, every rank)::

    L = Σ_s w(n_s) · Σ_{t in s} NLL_t  /  Σ_s w(n_s) · n_s

    token   w = 1        L = Σ NLL / Σ n                     (every token counts the same)
    sample  w = 1/n      L = (1/S) Σ_s mean_t NLL_t          (every sample counts the same)
    square  w = 1/√n     L = Σ_s √n_s · mean_t NLL_t / Σ √n_s (between the two; InternVL 2.5 / 3 packed SFT)

A sample without supervised tokens has weight 0. The denominator is the step's sum, so the gradient does not depend
on how the samples fall into micro-batches, packed rows or ranks (the original divides by each micro-batch's own sum,
then averages the ranks' denominators: docs/original-differences.md §5).

Example: two samples, NLL sums 1 over 2 tokens and 4 over 4 tokens. token: (1 + 4) / 6 = 0.8333; sample:
(1/2 + 4/4) / 2 = 0.75; square: (1/√2 + 4/√4) / (√2 + √4) = 0.7929.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

LossReduction = Literal["token", "sample", "square"]
LOSS_REDUCTIONS: tuple[str, ...] = ("token", "sample", "square")


def token_weights(num_tokens: torch.Tensor, reduction: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w(n) of each sample, for samples with `num_tokens` [S] supervised tokens (0 where n = 0)."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {reduction!r}")
    n = num_tokens.to(dtype)
    if reduction == "token":
        return (n > 0).to(dtype)
    power = 1.0 if reduction == "sample" else 0.5
    return torch.where(n > 0, n.clamp(min=1).pow(-power), torch.zeros_like(n))


def weight_total(num_tokens: list[int], reduction: str) -> float:
    """Σ_s w(n_s) · n_s for a list of samples' supervised token counts (a CPU number: the step's denominator is the
    sum of this over micro-batches and ranks). token: Σ n; sample: the number of samples with n > 0; square: Σ √n."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {', '.join(LOSS_REDUCTIONS)}, got {reduction!r}")
    if reduction == "token":
        return float(sum(num_tokens))
    if reduction == "sample":
        return float(sum(1 for n in num_tokens if n > 0))
    return sum(math.sqrt(n) for n in num_tokens)
