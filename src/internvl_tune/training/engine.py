"""The distributed engine around a recipe's loop (accelerate): set-up, resume, data stream, saves, teardown.

Recipes keep the loop (forward, loss, backward, step, log, save) in view; what both recipes do identically
around it lives here, so `sft.py` and `mpo.py` differ only in their method.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn
from torch.utils.data import DataLoader, Dataset

from internvl_tune.config import TrainArgs, to_dict
from internvl_tune.data.images import ImageTransform
from internvl_tune.data.sampler import ResumableBatchSampler
from internvl_tune.model.checkpoint_io import checkpoint_settings, metadata_for, save_hf_checkpoint
from internvl_tune.model.forward import base_model
from internvl_tune.training.checkpoint import (
    TrainState,
    keep_trainable_weights,
    prune_checkpoints,
    resolve_resume,
    save_adapter,
)
from internvl_tune.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


def make_accelerator(t: TrainArgs) -> Accelerator:
    # cpu=True on machines without an accelerator makes torchrun / accelerate launch give DDP over gloo.
    return Accelerator(mixed_precision="bf16" if t.bf16 else "no", cpu=not torch.accelerator.is_available())


def make_sampler(num_samples: int, t: TrainArgs, accelerator: Accelerator) -> ResumableBatchSampler:
    return ResumableBatchSampler(
        num_samples,
        t.per_device_train_batch_size,
        seed=t.seed,
        shuffle=t.shuffle,
        rank=accelerator.process_index,
        num_replicas=accelerator.num_processes,
    )


def schedule_lengths(sampler: ResumableBatchSampler, t: TrainArgs) -> tuple[int, int]:
    """(total optimizer steps, warmup steps)."""
    steps_per_epoch = max(1, sampler.batches_per_epoch // t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    return total_steps, math.ceil(t.warmup_ratio * total_steps)


def prepare_optimization(
    accelerator: Accelerator,
    forward: nn.Module,
    t: TrainArgs,
    total_steps: int,
    warmup_steps: int,
    *,
    uses_lora: bool,
    checkpointed: list = (),
):
    """AdamW + schedule, wrapped by accelerate; the scheduler, the train state and `checkpointed` objects
    (with state_dict / load_state_dict) are saved in every checkpoint. Returns (forward, optimizer, scheduler, state)."""
    optimizer = build_optimizer(
        forward, lr=t.learning_rate, weight_decay=t.weight_decay, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon
    )
    scheduler = build_scheduler(optimizer, kind=t.lr_scheduler_type, warmup_steps=warmup_steps, total_steps=total_steps)
    forward, optimizer = accelerator.prepare(forward, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state, *checkpointed)
    if uses_lora:
        # LoRA checkpoints hold the trained weights only; the frozen base comes from model_name_or_path on resume.
        accelerator.register_save_state_pre_hook(keep_trainable_weights)
    resume_dir = resolve_resume(t.resume_from_checkpoint, t.output_dir)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir), strict=not uses_lora)
        logger.info("resumed from %s at step %d", resume_dir, state.step)
    return forward, optimizer, scheduler, state


def data_stream(
    dataset: Dataset,
    sampler: ResumableBatchSampler,
    collate: Callable[[list], dict[str, Any]],
    state: TrainState,
    t: TrainArgs,
    num_workers: int,
) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches from the saved data position on.

    The position is the number of micro-batches consumed, so prefetching workers do not disturb it; the loader has
    its own generator, so creating it does not draw from the global RNG that a resume restored.
    """
    epoch, batch_in_epoch = divmod(state.micro_batches, sampler.batches_per_epoch)
    sampler.load_state_dict({"epoch": epoch, "batch": batch_in_epoch})
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(t.seed),
    )
    return iter(loader)


def blank_tile(image_size: int, normalize_type: str) -> torch.Tensor:
    """The dummy tile of text-only batches: a white image, normalised like real tiles
    (docs/original-differences.md §3.4)."""
    from PIL import Image

    return ImageTransform(image_size, normalize_type)(Image.new("RGB", (image_size, image_size), (255, 255, 255)))


def save_step_checkpoint(accelerator: Accelerator, state: TrainState, t: TrainArgs) -> None:
    folder = Path(t.output_dir) / f"checkpoint-{state.step}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / "train_state.json").write_text(json.dumps(state.state_dict()))
        prune_checkpoints(t.output_dir, t.save_total_limit)


def save_final(
    accelerator: Accelerator,
    forward: nn.Module,
    tokenizer,
    output_dir: Path,
    metadata: dict[str, Any],
    *,
    uses_lora: bool,
) -> Path:
    """`output_dir/final` (full model, LoRA merged) and, for LoRA, `final_adapter`; from the gathered state."""
    accelerator.wait_for_everyone()
    final_dir = output_dir / "final"
    # Gathered on every rank (ZeRO-3 / FSDP shards become whole tensors); written by the main process.
    final_state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(forward).items()}
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(forward).model
        if uses_lora:
            save_adapter(trained, tokenizer, output_dir / "final_adapter", metadata, final_state)
        save_hf_checkpoint(trained, tokenizer, final_dir, metadata, state_dict=final_state)
    return final_dir


def finish_run(
    accelerator: Accelerator,
    forward: nn.Module,
    tokenizer,
    config,
    settings,
    state: TrainState,
    *,
    uses_lora: bool,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Save the final model with its metadata, write `summary.json`, report skipped samples, tear down."""
    d, output_dir = config.data, Path(config.train.output_dir)
    model = accelerator.unwrap_model(forward).model
    # The family of the starting checkpoint (InternLM2 models train as Llama) travels on for `convert --to original`.
    family = checkpoint_settings(config.model.model_name_or_path).get("llm_family")
    metadata = metadata_for(
        base_model(model).config, {**asdict(settings), "llm_family": family}, config=to_dict(config)
    )
    final_dir = save_final(accelerator, forward, tokenizer, output_dir, metadata, uses_lora=uses_lora)
    summary = {
        "steps": state.step,
        **extra,
        "num_skipped": len(state.skipped),
        "skipped": state.skipped,
        "output_dir": str(output_dir),
        "final_model": str(final_dir),
    }
    if accelerator.is_main_process:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
        if state.skipped:
            logger.warning("%d bad samples were skipped:", len(state.skipped))
            for where, message in state.skipped[:20]:
                logger.warning("  %s", message if message.startswith(where) else f"{where}: {message}")
        if state.num_truncated:
            logger.warning("%d samples had their text cut to max_seq_length=%d", state.num_truncated, d.max_seq_length)
    finish(accelerator)
    return summary


def finish(accelerator: Accelerator) -> None:
    accelerator.end_training()
    # Forget this run's precision so a later run in the same process (tests, the demo, notebooks) may choose
    # another; the process group (PartialState) is kept.
    AcceleratorState._reset_state()
