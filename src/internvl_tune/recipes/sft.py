"""Supervised fine-tuning of InternVL: the whole loop, top to bottom.

Launch: `internvl-tune sft --config configs/sft/FILE.yaml [key=value ...]`, or under `accelerate launch` /
`torchrun` for several processes (the same code path gives DDP, FSDP or DeepSpeed from the accelerate config).

The loss is a weighted token mean over the whole optimizer step (`train.loss_reduction`: token, sample or square
weights, losses/reduction.py): each micro-batch's weighted NLL is divided by the step's sum of weights over all its
micro-batches on all ranks. This fixes the original's mean of per-micro-batch means (docs/original-differences.md
§5), and makes packed and padded batches train alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from internvl_tune.config import SFTConfig, to_dict
from internvl_tune.data.collate import pack_collate, pad_collate
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.errors import DataError
from internvl_tune.data.images import blank_tile
from internvl_tune.data.transform import SampleBuilder
from internvl_tune.losses.reduction import token_weights, weight_total
from internvl_tune.losses.router import router_aux_coefficient
from internvl_tune.model.forward import InternVLTrainingForward, base_model
from internvl_tune.model.freeze import count_parameters
from internvl_tune.model.logprobs import label_gather
from internvl_tune.model.prepare import check_template, prepare_policy, sample_settings
from internvl_tune.training.batching import (
    data_stream,
    epoch_progress,
    make_batching,
    next_step,
    sampler_position,
    schedule_lengths,
)
from internvl_tune.training.engine import backward, idle_loss, micro_batch
from internvl_tune.training.metrics import (
    MetricsWriter,
    is_logging_step,
    read_step_metrics,
    start_tracker,
    step_totals,
    throughput_metrics,
)
from internvl_tune.training.optim import prepare_optimization
from internvl_tune.training.saving import finish_run, save_and_stop, save_step_checkpoint
from internvl_tune.training.session import StopRequest, prepare_output_dir, run_session

logger = logging.getLogger(__name__)


def train(config: SFTConfig) -> dict[str, Any]:
    """Run SFT as configured; returns a summary (final loss, steps, skipped samples, paths). Raises
    `TrainingInterrupted` after saving a checkpoint when stopped by SIGINT / SIGTERM."""
    # `cleanup` closes the progress bar when the run raises, so that the error is printed on a line of its own.
    with run_session(config.train) as accelerator, StopRequest() as stop, contextlib.ExitStack() as cleanup:
        return _train(config, accelerator, stop, cleanup)


def _train(
    config: SFTConfig, accelerator: Accelerator, stop: StopRequest, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    model_args, data_args, train_args = config.model, config.data, config.train
    set_seed(train_args.seed)
    output_dir, resume_dir = prepare_output_dir(accelerator, train_args)

    # Model: load, then the original order of DropPath, freezing, LoRA, checkpointing.
    check_template(data_args, model_args.model_name_or_path)  # before the model loads: a wrong one is one line
    model, tokenizer = prepare_policy(model_args)
    num_trainable, num_total = count_parameters(model)

    # Data: meta -> records -> samples -> this rank's padded micro-batches.
    settings = sample_settings(data_args, model.config)
    builder = SampleBuilder(tokenizer, settings)
    dataset = RecordDataset(data_args.meta_path, builder, seed=train_args.seed, on_bad_sample=data_args.on_bad_sample)
    # Random batches, length-grouped batches, or packed rows (planned from the length cache).
    sampler, dataset, bad_records = make_batching(
        dataset, builder.measure, settings, tokenizer, data_args, train_args, accelerator
    )
    dummy_tile = blank_tile(settings.image_size, settings.normalize_type)
    if data_args.packing:
        collate = partial(
            pack_collate,
            pad_token_id=tokenizer.pad_token_id,
            dummy_tile=dummy_tile,
            max_packed_tokens=data_args.max_packed_tokens,
        )
    else:
        collate = partial(pad_collate, pad_token_id=tokenizer.pad_token_id, dummy_tile=dummy_tile)
    total_steps, warmup_steps = schedule_lengths(sampler, train_args)

    uses_lora = bool(model_args.use_llm_lora or model_args.use_backbone_lora)
    # MoE LLMs: the router's load-balancing loss joins the loss as the original adds it (losses/router.py).
    aux_coef = router_aux_coefficient(train_args.router_aux_loss_coef, base_model(model).config.text_config, "sft")
    training_forward = InternVLTrainingForward(model)
    if aux_coef:
        training_forward.track_router_loss()
    forward, optimizer, scheduler, state = prepare_optimization(
        accelerator,
        training_forward,
        model_args,
        train_args,
        total_steps,
        warmup_steps,
        uses_lora=uses_lora,
        resume_dir=resume_dir,
    )
    micro_batches = data_stream(dataset, sampler, collate, state, train_args, data_args.dataloader_num_workers)

    tracker = start_tracker(accelerator, train_args.report_to, output_dir, to_dict(config), state.step)
    metrics = MetricsWriter(output_dir, enabled=accelerator.is_main_process, start_step=state.step, tracker=tracker)
    if accelerator.is_main_process:
        (output_dir / "config.resolved.json").write_text(json.dumps(to_dict(config), indent=2, ensure_ascii=False))
        logger.info(
            "trainable parameters %d of %d; %d samples; %d steps", num_trainable, num_total, len(dataset), total_steps
        )
    progress = cleanup.enter_context(
        tqdm(total=total_steps, initial=state.step, desc="sft", disable=not accelerator.is_main_process)
    )
    forward.train()
    last_loss = float("nan")
    empty_micro_batches = 0
    while state.step < total_steps:
        if stop.requested(accelerator):  # Ctrl-C or SIGTERM: save this step boundary and exit
            progress.close()  # before the exit line is printed
            save_and_stop(accelerator, state, train_args)
        step_start = time.perf_counter()
        batches = next_step(micro_batches, sampler, state, train_args, accelerator, bad_records)
        # The step's loss denominator: Σ w(n)·n over its samples, all micro-batches, all ranks (CPU counts;
        # losses/reduction.py), and its labelled tokens.
        sample_tokens = [int(n) for b in batches if b["num_samples"] for n in b["num_labels"]]
        # The router loss is a mean over the step's trained micro-batches on all ranks (the original adds it to each
        # forward's loss, which the accumulation and DDP then average).
        num_tokens, loss_weight, num_forwards = step_totals(
            accelerator,
            [
                sum(sample_tokens),
                weight_total(sample_tokens, train_args.loss_reduction),
                sum(1 for b in batches if b["num_samples"]),
            ],
        )
        if num_tokens == 0:
            empty_micro_batches += len(batches)
            if empty_micro_batches >= sampler.batches_in_epoch(sampler_position(sampler, state.micro_batches)[0]):
                raise DataError(f"a whole epoch of samples was skipped as bad; first problems: {state.skipped[:3]}")
            # Its samples measured well but failed as they were built (an image that cannot be decoded): the step
            # passes without an update, so the step count and the schedule stay those planned.
            logger.warning("step %d: every sample of the step was skipped as bad; no update", state.step + 1)
            scheduler.step()
            state.step += 1
            progress.update(1)
            continue
        empty_micro_batches = 0

        # Metrics stay device tensors until a logging step; stage timing waits for the device, so only then.
        logging_step = is_logging_step(state.step + 1, train_args, total_steps)
        sums: dict[str, torch.Tensor] = {}
        policy_forward = accelerator.unwrap_model(forward)
        policy_forward.vit_seconds, policy_forward.time_stages = 0.0, logging_step
        for i, batch in enumerate(batches):
            with micro_batch(accelerator, forward, last=i == len(batches) - 1):
                if batch["num_samples"] == 0:
                    # Nothing to train here (samples skipped, or past the end of a packed epoch): a zero loss from
                    # a real forward keeps the ranks in step.
                    loss = idle_loss(forward, accelerator, tokenizer.pad_token_id, dummy_tile)
                else:
                    # The LM head runs only where a label is read: no [B, T, vocab] logits.
                    index, targets, _ = label_gather(batch["labels"])
                    layout = ("attention_groups", "attention_roles") if data_args.packing else ("attention_mask",)
                    # Each target's weight w(n) of its sample (the token after the predicting position).
                    sample_of_target = batch["sample_ids"].view(-1)[index + 1]
                    weights = token_weights(batch["num_labels"], train_args.loss_reduction)[sample_of_target]
                    token_logps = forward(
                        input_ids=batch["input_ids"].to(accelerator.device, non_blocking=True),
                        **{
                            "attention_mask": None,
                            **{k: batch[k].to(accelerator.device, non_blocking=True) for k in layout},
                        },
                        position_ids=batch["position_ids"].to(accelerator.device, non_blocking=True),
                        pixel_values=batch["pixel_values"].to(accelerator.device, non_blocking=True),
                        image_flags=batch["image_flags"],  # stays on CPU: the tile split is made there
                        logp_index=index.to(accelerator.device, non_blocking=True),
                        logp_targets=targets.to(accelerator.device, non_blocking=True),
                    )
                    weighted_nll = -(token_logps * weights.to(accelerator.device, non_blocking=True)).sum()
                    sums["loss"] = sums.get("loss", 0.0) + weighted_nll.detach().double() / loss_weight
                    # DDP averages gradients over ranks; multiplying by the world size makes it a global sum.
                    loss = weighted_nll * accelerator.num_processes / loss_weight
                    if aux_coef:
                        aux = policy_forward.aux_loss
                        sums["aux_loss"] = sums.get("aux_loss", 0.0) + aux.detach().double() / num_forwards
                        loss = loss + aux_coef * aux * accelerator.num_processes / num_forwards
                backward(accelerator, loss)
        grad_norm = (
            accelerator.clip_grad_norm_(forward.parameters(), train_args.max_grad_norm)
            if train_args.max_grad_norm > 0
            else None
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        progress.update(1)

        if logging_step:
            totals = read_step_metrics(accelerator, sums)
            last_loss = totals.get("loss", float("nan"))
            progress.set_postfix(loss=f"{last_loss:.4f}")
            elapsed = time.perf_counter() - step_start
            (num_samples,) = step_totals(accelerator, [sum(b["num_samples"] for b in batches)])
            metrics.write(
                state.step,
                {
                    "loss": last_loss,
                    **({"aux_loss": totals.get("aux_loss", float("nan"))} if aux_coef else {}),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "epoch": epoch_progress(sampler, state.micro_batches),
                    **throughput_metrics(
                        accelerator, batches, elapsed, num_samples=num_samples, num_loss_tokens=num_tokens
                    ),
                    "num_truncated": state.num_truncated,
                    "vit_time_share": policy_forward.vit_seconds / elapsed,
                },
            )
        if train_args.save_steps and state.step % train_args.save_steps == 0 and state.step < total_steps:
            save_step_checkpoint(accelerator, state, train_args)
    progress.close()

    return finish_run(
        accelerator,
        forward,
        tokenizer,
        config,
        settings,
        state,
        optimizer=optimizer,
        uses_lora=uses_lora,
        extra={"final_loss": last_loss, "num_truncated": state.num_truncated},
    )
