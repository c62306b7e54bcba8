"""Supervised fine-tuning of InternVL: the whole loop, top to bottom.

Launch: `internvl-tune sft --config configs/sft/FILE.yaml [key=value ...]`, or under `accelerate launch` /
`torchrun` for several processes (the same code path gives DDP, FSDP or DeepSpeed from the accelerate config).

The loss is the global token mean over an optimizer step: each micro-batch's summed NLL is divided by the
number of labelled tokens in all micro-batches of the step on all ranks (spec §9.9 fixes the original's mean of
per-micro-batch means).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from internvl_tune.config import SFTConfig, to_dict
from internvl_tune.constants import IGNORE_INDEX
from internvl_tune.data.collate import pad_collate
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.errors import DataError
from internvl_tune.data.images import ImageTransform
from internvl_tune.data.sampler import ResumableBatchSampler
from internvl_tune.data.transform import SampleBuilder, SampleSettings
from internvl_tune.losses.sft import token_nll_sum
from internvl_tune.model.checkpoint_io import save_hf_checkpoint
from internvl_tune.model.drop_path import add_drop_path
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.model.freeze import apply_freezing, count_parameters
from internvl_tune.model.load import image_geometry, load_model
from internvl_tune.model.lora import apply_lora
from internvl_tune.training.checkpoint import (
    TrainState,
    checkpoint_metadata,
    keep_trainable_weights,
    prune_checkpoints,
    resolve_resume,
    save_adapter,
)
from internvl_tune.training.metrics import MetricsWriter
from internvl_tune.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


def sample_settings(config: SFTConfig, model_config) -> SampleSettings:
    """Data settings for this model: tile size and image tokens come from the model config."""
    geometry = image_geometry(model_config)
    d = config.data
    if d.force_image_size is not None and d.force_image_size != geometry.image_size:
        raise ValueError(
            f"data.force_image_size={d.force_image_size} but the model's vision image_size is {geometry.image_size}; "
            "resizing the ViT position embeddings is not supported: leave force_image_size unset"
        )
    return SampleSettings(
        template=d.conv_style,
        system_message=d.system_message,
        max_seq_length=d.max_seq_length,
        image_size=geometry.image_size,
        num_image_token=geometry.num_image_token,
        dynamic_image_size=d.dynamic_image_size,
        use_thumbnail=d.use_thumbnail,
        min_dynamic_patch=d.min_dynamic_patch,
        max_dynamic_patch=d.max_dynamic_patch,
        min_num_frame=d.min_num_frame,
        max_num_frame=d.max_num_frame,
        video_sample=d.video_sample,
        normalize_type=d.normalize_type,
        pad2square=d.pad2square,
    )


def train(config: SFTConfig) -> dict[str, Any]:
    """Run SFT as configured; returns a summary (final loss, steps, skipped samples, paths)."""
    m, d, t = config.model, config.data, config.train
    # cpu=True on machines without an accelerator makes torchrun / accelerate launch give DDP over gloo.
    accelerator = Accelerator(mixed_precision="bf16" if t.bf16 else "no", cpu=not torch.accelerator.is_available())
    set_seed(t.seed)
    output_dir = Path(t.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # Model: load, then the original order of DropPath, freezing, LoRA, checkpointing.
    model, tokenizer = load_model(m.model_name_or_path, attn_implementation=m.attn_implementation)
    add_drop_path(model, m.drop_path_rate)
    apply_freezing(
        model,
        freeze_backbone=m.freeze_backbone,
        freeze_mlp=m.freeze_mlp,
        freeze_llm=m.freeze_llm,
        unfreeze_vit_layers=m.unfreeze_vit_layers,
        unfreeze_lm_head=m.unfreeze_lm_head,
    )
    model = apply_lora(
        model,
        use_llm_lora=m.use_llm_lora,
        use_backbone_lora=m.use_backbone_lora,
        lora_dropout=m.lora_dropout,
        unfreeze_lm_head=m.unfreeze_lm_head,
    )
    if m.grad_checkpoint:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    num_trainable, num_total = count_parameters(model)

    # Data: meta -> records -> samples -> this rank's padded micro-batches.
    settings = sample_settings(config, model.config)
    dataset = RecordDataset(d.meta_path, SampleBuilder(tokenizer, settings), seed=t.seed, on_bad_sample=d.on_bad_sample)
    sampler = ResumableBatchSampler(
        len(dataset),
        t.per_device_train_batch_size,
        seed=t.seed,
        shuffle=t.shuffle,
        rank=accelerator.process_index,
        num_replicas=accelerator.num_processes,
    )
    blank = ImageTransform(settings.image_size, settings.normalize_type)(_white_tile(settings.image_size))
    collate = partial(pad_collate, pad_token_id=tokenizer.pad_token_id, dummy_tile=blank)
    steps_per_epoch = max(1, sampler.batches_per_epoch // t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    warmup_steps = math.ceil(t.warmup_ratio * total_steps)

    forward = InternVLTrainingForward(model)
    optimizer = build_optimizer(
        forward,
        lr=t.learning_rate,
        weight_decay=t.weight_decay,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
    )
    scheduler = build_scheduler(optimizer, kind=t.lr_scheduler_type, warmup_steps=warmup_steps, total_steps=total_steps)
    forward, optimizer = accelerator.prepare(forward, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)

    uses_lora = bool(m.use_llm_lora or m.use_backbone_lora)
    if uses_lora:
        # LoRA checkpoints hold the trained weights only; the frozen base comes from model_name_or_path on resume.
        accelerator.register_save_state_pre_hook(keep_trainable_weights)

    resume_dir = resolve_resume(t.resume_from_checkpoint, output_dir)
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir), strict=not uses_lora)
        logger.info("resumed from %s at step %d", resume_dir, state.step)
    # The data position is the number of micro-batches consumed, so prefetching workers do not disturb it.
    epoch, batch_in_epoch = divmod(state.micro_batches, sampler.batches_per_epoch)
    sampler.load_state_dict({"epoch": epoch, "batch": batch_in_epoch})
    # Its own generator: creating the loader's iterator must not draw from the global RNG restored by resume.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=d.dataloader_num_workers,
        generator=torch.Generator().manual_seed(t.seed),
    )
    micro_batches = iter(loader)

    metrics = MetricsWriter(output_dir, enabled=accelerator.is_main_process, tensorboard=t.report_to == "tensorboard")
    if accelerator.is_main_process:
        (output_dir / "config.resolved.json").write_text(json.dumps(to_dict(config), indent=2, ensure_ascii=False))
        logger.info(
            "trainable parameters %d of %d; %d samples; %d steps", num_trainable, num_total, len(dataset), total_steps
        )
    progress = tqdm(total=total_steps, initial=state.step, desc="sft", disable=not accelerator.is_main_process)
    forward.train()
    last_loss = float("nan")
    empty_micro_batches = 0
    while state.step < total_steps:
        step_start = time.perf_counter()
        batches = [next(micro_batches) for _ in range(t.gradient_accumulation_steps)]
        state.micro_batches += len(batches)
        for batch in batches:
            state.skipped += batch["skipped"]
            state.num_truncated += batch.get("num_truncated", 0)
        # The step's loss denominator: labelled tokens over all its micro-batches on all ranks.
        local_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches if b["num_samples"])
        num_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
        if num_tokens == 0:
            empty_micro_batches += len(batches)
            if empty_micro_batches >= sampler.batches_per_epoch:
                raise DataError(f"a whole epoch of samples was skipped as bad; first problems: {state.skipped[:3]}")
            logger.warning("step %d: every sample of the step was skipped; no update", state.step)
            continue
        empty_micro_batches = 0

        loss_sum = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(batches):
            sync = i == len(batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(forward):
                if batch["num_samples"] == 0:
                    # All its samples were skipped (counted above); a zero loss keeps ranks in step.
                    loss = sum(p.sum() for p in forward.parameters() if p.requires_grad) * 0.0
                else:
                    logits = forward(
                        input_ids=batch["input_ids"].to(accelerator.device),
                        attention_mask=batch["attention_mask"].to(accelerator.device),
                        position_ids=batch["position_ids"].to(accelerator.device),
                        pixel_values=batch["pixel_values"].to(accelerator.device),
                        image_flags=batch["image_flags"].to(accelerator.device),
                    )
                    nll_sum, _ = token_nll_sum(logits, batch["labels"].to(accelerator.device))
                    loss_sum += nll_sum.detach()
                    # DDP averages gradients over ranks; multiplying by the world size makes it a global sum.
                    loss = nll_sum * accelerator.num_processes / num_tokens
                accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(forward.parameters(), t.max_grad_norm) if t.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1

        last_loss = float(accelerator.reduce(loss_sum, "sum")) / num_tokens
        progress.update(1)
        progress.set_postfix(loss=f"{last_loss:.4f}")
        if state.step % t.logging_steps == 0 or state.step == total_steps:
            elapsed = time.perf_counter() - step_start
            real = [b for b in batches if b["num_samples"]]
            counts = torch.tensor(
                [
                    sum(b["num_samples"] for b in real),
                    sum(b["num_image_tokens"] for b in real),
                    sum(b["num_text_tokens"] for b in real),
                    sum(b["num_pad_tokens"] for b in real),
                    sum(b["input_ids"].numel() for b in real),
                ],
                device=accelerator.device,
            )
            num_samples, num_image_tokens, num_text_tokens, num_pad, num_positions = accelerator.reduce(
                counts, "sum"
            ).tolist()
            metrics.write(
                state.step,
                {
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "epoch": state.micro_batches / sampler.batches_per_epoch,
                    "num_samples": num_samples,
                    "num_loss_tokens": num_tokens,
                    "num_image_tokens": num_image_tokens,
                    "num_text_tokens": num_text_tokens,
                    "padding_share": num_pad / max(1, num_positions),
                    "samples_per_s": num_samples / elapsed,
                    "tokens_per_s": (num_image_tokens + num_text_tokens) / elapsed,
                    "step_time_s": elapsed,
                },
            )
        if t.save_steps and state.step % t.save_steps == 0 and state.step < total_steps:
            accelerator.save_state(str(output_dir / f"checkpoint-{state.step}"))
            if accelerator.is_main_process:
                (output_dir / f"checkpoint-{state.step}" / "train_state.json").write_text(
                    json.dumps(state.state_dict())
                )
                prune_checkpoints(output_dir, t.save_total_limit)
    progress.close()
    metrics.close()

    accelerator.wait_for_everyone()
    final_dir = output_dir / "final"
    # Gathered on every rank (ZeRO-3 / FSDP shards become whole tensors); written by the main process.
    final_state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(forward).items()}
    if accelerator.is_main_process:
        metadata = checkpoint_metadata(
            to_dict(config),
            {**asdict(settings), "patch_size": image_geometry(model.config).patch_size},
            d.conv_style,
            d.system_message,
        )
        trained = accelerator.unwrap_model(forward).model
        if uses_lora:
            save_adapter(trained, tokenizer, output_dir / "final_adapter", metadata, final_state)
        save_hf_checkpoint(trained, tokenizer, final_dir, metadata, state_dict=final_state)
    summary = {
        "steps": state.step,
        "final_loss": last_loss,
        "num_skipped": len(state.skipped),
        "skipped": state.skipped,
        "num_truncated": state.num_truncated,
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
    accelerator.end_training()
    # Forget this run's precision so a later run in the same process (tests, the demo, notebooks) may choose
    # another; the process group (PartialState) is kept.
    AcceleratorState._reset_state()
    return summary


def _white_tile(size: int):
    from PIL import Image

    return Image.new("RGB", (size, size), (255, 255, 255))
