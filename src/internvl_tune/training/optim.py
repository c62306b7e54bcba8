"""AdamW with the usual no-decay groups, warmup + cosine/linear/constant schedules, and their preparation for a run:
wrapped by the engine, restored on resume with this run's settings."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from internvl_tune.config import ConfigError, ModelArgs, TrainArgs
from internvl_tune.training.checkpoint import TrainState, read_train_state
from internvl_tune.training.engine import check_resume_engine, engine_name, keep_only_trained_weights, load_checkpoint

logger = logging.getLogger(__name__)


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


# The model settings that decide which parameters train: a resume cannot change them (the optimizer state is the old
# parameters'), so a change is refused by name instead of failing in PyTorch's optimizer loading.
TRAINED_SETTINGS = (
    "freeze_backbone",
    "freeze_mlp",
    "freeze_llm",
    "unfreeze_vit_layers",
    "unfreeze_lm_head",
    "use_backbone_lora",
    "use_llm_lora",
)


def run_settings(m: ModelArgs, t: TrainArgs, total_steps: int, warmup_steps: int) -> dict[str, Any]:
    """What a checkpoint records of how it was trained: the trained-parameter settings (fixed for the run) and the
    optimizer and schedule settings (a resume applies the new ones from its first step)."""
    return {
        "trained": {f"model.{name}": getattr(m, name) for name in TRAINED_SETTINGS},
        "optimizer": {
            "train.learning_rate": t.learning_rate,
            "train.weight_decay": t.weight_decay,
            "train.adam_beta1": t.adam_beta1,
            "train.adam_beta2": t.adam_beta2,
            "train.adam_epsilon": t.adam_epsilon,
            "train.lr_scheduler_type": t.lr_scheduler_type,
            "total steps": total_steps,
            "warmup steps": warmup_steps,
        },
    }


def _changes(saved: dict[str, Any], current: dict[str, Any]) -> str:
    return ", ".join(f"{k} {saved.get(k)} -> {current.get(k)}" for k in current if saved.get(k) != current.get(k))


def prepare_optimization(
    accelerator: Accelerator,
    forward: nn.Module,
    m: ModelArgs,
    t: TrainArgs,
    total_steps: int,
    warmup_steps: int,
    *,
    uses_lora: bool,
    resume_dir: Path | None,
    checkpointed: list = (),
):
    """AdamW + schedule, wrapped by accelerate; the scheduler, the train state and `checkpointed` objects
    (with state_dict / load_state_dict) are saved in every checkpoint and restored from `resume_dir`.

    A resume keeps the weights, the optimizer's moments and the position, and trains on with the settings it is
    given: a changed learning rate, weight decay, Adam setting, schedule or step count applies from the resumed
    step on (logged), as `config.resolved.json` records. A change of what is trained (`TRAINED_SETTINGS`) is
    refused. Returns (forward, optimizer, scheduler, state)."""
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    optimizer = build_optimizer(
        forward,
        lr=t.learning_rate,
        weight_decay=t.weight_decay,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        fused=not sharded,
    )
    scheduler = build_scheduler(optimizer, kind=t.lr_scheduler_type, warmup_steps=warmup_steps, total_steps=total_steps)
    forward, optimizer = accelerator.prepare(forward, optimizer)
    state = TrainState()
    settings = run_settings(m, t, total_steps, warmup_steps)
    settings["engine"] = {"engine": engine_name(accelerator), "processes": accelerator.num_processes}
    accelerator.register_for_checkpointing(scheduler, state, *checkpointed)
    if uses_lora:
        # LoRA checkpoints hold the trained weights only; the frozen base comes from model_name_or_path on resume.
        keep_only_trained_weights(accelerator)
    if resume_dir is not None:
        saved = read_train_state(resume_dir).get("settings")  # None: a checkpoint of an older version
        if saved is not None and (changed := _changes(saved["trained"], settings["trained"])):
            raise ConfigError(
                f"{resume_dir} trained other parameters ({changed}); a resume continues the same parameters: "
                "restore the setting, or start a new run from the checkpoint's weights"
            )
        if saved is not None and "engine" in saved:
            check_resume_engine(resume_dir, saved["engine"], settings["engine"])
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        load_checkpoint(accelerator, resume_dir, uses_lora=uses_lora)
        apply_optimizer_settings(optimizer, scheduler, fresh)
        if saved is not None and (changed := _changes(saved["optimizer"], settings["optimizer"])):
            logger.warning("resumed at step %d with new settings, applied from here on: %s", state.step, changed)
        logger.info("resumed from %s at step %d", resume_dir, state.step)
    state.settings = settings  # what this run trains with (a resume loaded the interrupted run's)
    return forward, optimizer, scheduler, state


def apply_optimizer_settings(optimizer, scheduler, fresh: list[dict[str, Any]]) -> None:
    """After a resume, the optimizer's groups and the schedule's peak take this run's settings (`fresh`: the groups'
    settings before the checkpoint was loaded), and the current learning rate follows from them at the resumed step.
    Loading restores the interrupted run's values, so without this a changed learning rate would be recorded and not
    used; the schedule's shape (kind, warmup, total steps) is this run's already (its function is not saved)."""
    for group, settings in zip(optimizer.param_groups, fresh, strict=True):
        for key in ("initial_lr", "weight_decay", "betas", "eps"):
            group[key] = settings[key]
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    scheduler.last_epoch -= 1
    scheduler.step()  # the same step again: each group's learning rate from the new peak
