"""AdamW with the usual no-decay groups, and warmup + cosine/linear/constant schedules."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from internvl_tune.config import ConfigError


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float, fused: bool = True
) -> torch.optim.AdamW:
    """AdamW over trainable parameters; biases, norms and layer scales (1-D tensors) get no weight decay.

    `fused` runs PyTorch's fused AdamW kernel (CPU and CUDA): one pass over each parameter, without the
    temporaries the default implementation allocates (on CUDA its `foreach` path holds whole-model copies of the
    second moments during the step; on CPU one parameter's worth at a time, 310 MiB for a 151,674 x 512 fp32
    embedding), and one kernel launch per group on CUDA. Same update up to float rounding. Sharded
    engines (FSDP, DeepSpeed) bring their own parameter types and pass fused=False.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("no trainable parameters: check the freeze_* and LoRA settings")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused)


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at `step` (the scheduler is stepped after each optimizer step).

    Linear warmup from 0 over `warmup_steps`, then cosine or linear decay to 0 at `total_steps`, or constant.
    Example (warmup 2, total 10, cosine): steps 0, 1, 2 -> 0, 0.5, 1.0; step 6 -> 0.5; step 10 -> 0.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    def schedule(step: int) -> float:
        return lr_lambda(step, warmup_steps=warmup_steps, total_steps=total_steps, kind=kind)

    return LambdaLR(optimizer, schedule)
