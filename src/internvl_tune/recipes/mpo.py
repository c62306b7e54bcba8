"""Mixed Preference Optimization of InternVL: the whole loop, top to bottom.

Launch: `internvl-tune mpo --config configs/mpo/FILE.yaml [key=value ...]` (or under `accelerate launch` /
`torchrun`). The same shape, names and order as `sft.py`; what differs is the pair forward, the reference and
the objective (docs/original-differences.md §6).

The step's loss is normalised globally: the recipe counts the step's pairs and chosen tokens on all ranks, and the
objective returns each micro-batch's share (preference terms summed over its pairs and divided by the step's pairs;
the SFT term its chosen NLL over the step's chosen tokens, or with `mpo.sft_reduction=sample` its per-pair token means
over the step's pairs). With one pair per step and one process this is exactly the original; with more it does not
depend on how pairs fall into micro-batches and ranks. The BCO shift delta is updated on every training micro-batch
with the mean reward over all ranks (`objective.rewards`), read after the update, and saved in checkpoints. A
precomputed reference is checked against every pair of the data, images' bytes included, before the first step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from internvl_tune.checkpoints.read import weights_fingerprint
from internvl_tune.config import MPOConfig, to_dict
from internvl_tune.data.collate import pair_collate
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.errors import DataError
from internvl_tune.data.images import blank_tile
from internvl_tune.data.preference import PairBuilder
from internvl_tune.data.transform import SampleBuilder
from internvl_tune.losses.objective import PreferenceObjective
from internvl_tune.losses.reduction import weight_total
from internvl_tune.losses.router import router_aux_coefficient
from internvl_tune.losses.running import RunningRewardMean
from internvl_tune.model.forward import InternVLTrainingForward, base_model, stage_clock
from internvl_tune.model.freeze import count_parameters
from internvl_tune.model.load import load_model
from internvl_tune.model.logprobs import pair_logps
from internvl_tune.model.prepare import check_template, prepare_policy, sample_settings
from internvl_tune.model.reference import LiveReference, ReferenceCache, frozen_copy
from internvl_tune.training.batching import (
    data_stream,
    epoch_progress,
    make_batching,
    next_step,
    sampler_position,
    schedule_lengths,
)
from internvl_tune.training.engine import backward, idle_loss, micro_batch, prepare_reference
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


def build_objective(config: MPOConfig) -> PreferenceObjective:
    """The objective of `config.mpo`, as `MPOConfig.validate` checked it (one reading of the loss spellings)."""
    return PreferenceObjective.from_config(**config.mpo.loss_settings())


def reference_cache_path(config: MPOConfig) -> Path:
    return Path(config.mpo.reference_cache or Path(config.train.output_dir) / "reference_logps.pt")


def cache_settings(settings) -> dict[str, Any]:
    """What precomputed reference log-probs depend on, besides the records and the weights."""
    return asdict(settings)


def update_delta(
    running: RunningRewardMean, accelerator, rewards: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Fold this micro-batch's mean reward of every rank into delta (docs/original-differences.md §6.4), on the
    device; a rank whose pairs were all skipped passes None and still joins the all-reduce."""
    if rewards is None:
        local = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    else:
        mean = RunningRewardMean.local_mean(*rewards)
        local = torch.stack([mean, torch.ones_like(mean)])
    rank_means_sum, num_ranks = accelerator.reduce(local, "sum")  # [sum of rank means, ranks that had pairs]
    return running.update(rank_means_sum, num_ranks)


def train(config: MPOConfig) -> dict[str, Any]:
    """Run MPO as configured; returns a summary (final loss, steps, skipped pairs, paths). Raises
    `TrainingInterrupted` after saving a checkpoint when stopped by SIGINT / SIGTERM."""
    # `cleanup` closes the progress bar when the run raises, so that the error is printed on a line of its own.
    with run_session(config.train) as accelerator, StopRequest() as stop, contextlib.ExitStack() as cleanup:
        return _train(config, accelerator, stop, cleanup)


def _train(
    config: MPOConfig, accelerator: Accelerator, stop: StopRequest, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    model_args, data_args, train_args, mpo_args = config.model, config.data, config.train, config.mpo
    set_seed(train_args.seed)
    output_dir, resume_dir = prepare_output_dir(accelerator, train_args)
    objective = build_objective(config)

    # Model: load, then the original order of DropPath, freezing, LoRA, checkpointing.
    check_template(data_args, model_args.model_name_or_path)  # before the model loads: a wrong one is one line
    model, tokenizer = prepare_policy(model_args)
    num_trainable, num_total = count_parameters(model)

    # Data: meta -> records -> pairs -> this rank's [prompt | chosen | rejected] micro-batches.
    settings = sample_settings(data_args, model.config)
    builder = PairBuilder(SampleBuilder(tokenizer, settings))
    dataset = RecordDataset(
        data_args.meta_path,
        builder,
        seed=train_args.seed,
        on_bad_sample=data_args.on_bad_sample,
        require_data_augment=False,
    )
    # Random batches, length-grouped batches, or packed rows of pairs (planned from the length cache).
    sampler, train_data, bad_records = make_batching(
        dataset, builder.measure, settings, tokenizer, data_args, train_args, accelerator
    )
    dummy_tile = blank_tile(settings.image_size, settings.normalize_type)
    collate = partial(
        pair_collate,
        pad_token_id=tokenizer.pad_token_id,
        dummy_tile=dummy_tile,
        mode=mpo_args.pair_layout,
    )
    total_steps, warmup_steps = schedule_lengths(sampler, train_args)

    # Reference: a frozen copy, the LoRA-disabled policy, or precomputed log-probs (no second model).
    if mpo_args.reference == "precomputed":
        reference = ReferenceCache.load(
            reference_cache_path(config),
            fingerprint=weights_fingerprint(model_args.model_name_or_path),
            settings=cache_settings(settings),
        )
        # Every pair, its images' and videos' bytes included, before the first step: a stale cache stops here.
        reference.check(dataset, progress=accelerator.is_main_process)
    elif mpo_args.reference == "lora_disabled":
        reference = LiveReference(model, disable_lora_of=model)
    else:
        reference_model, _ = load_model(
            model_args.model_name_or_path,
            dtype=torch.bfloat16 if train_args.bf16 else torch.float32,
            attn_implementation=model_args.attn_implementation,
        )
        # Sharded like the policy under FSDP2 and ZeRO-3, never a silent whole copy on every rank.
        reference_model = frozen_copy(reference_model)
        reference = LiveReference(reference_model, forward=prepare_reference(accelerator, reference_model))

    uses_lora = bool(model_args.use_llm_lora or model_args.use_backbone_lora)
    running = RunningRewardMean()
    # MoE LLMs: the router's load-balancing loss joins the loss as the original adds it (losses/router.py).
    aux_coef = router_aux_coefficient(train_args.router_aux_loss_coef, base_model(model).config.text_config, "mpo")
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
        checkpointed=[running],
    )
    micro_batches = data_stream(train_data, sampler, collate, state, train_args, data_args.dataloader_num_workers)

    tracker = start_tracker(accelerator, train_args.report_to, output_dir, to_dict(config), state.step)
    metrics = MetricsWriter(output_dir, enabled=accelerator.is_main_process, start_step=state.step, tracker=tracker)
    if accelerator.is_main_process:
        (output_dir / "config.resolved.json").write_text(json.dumps(to_dict(config), indent=2, ensure_ascii=False))
        logger.info(
            "trainable parameters %d of %d; %d pairs; %d steps; reference: %s",
            num_trainable,
            num_total,
            len(dataset),
            total_steps,
            mpo_args.reference,
        )
    progress = cleanup.enter_context(
        tqdm(total=total_steps, initial=state.step, desc="mpo", disable=not accelerator.is_main_process)
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
        # The step's denominators: pairs and chosen tokens over all its micro-batches on all ranks (CPU counts).
        real = [b for b in batches if b["num_pairs"]]
        chosen_lengths = [int(n) for b in real for n in b["chosen_mask"].sum(-1)]
        # The router loss is a mean over the step's policy forwards on all ranks (as TRL adds it to each forward's).
        num_pairs, num_chosen_tokens, num_rejected_tokens, sft_weight, num_forwards = step_totals(
            accelerator,
            [
                sum(b["num_pairs"] for b in real),
                sum(chosen_lengths),
                sum(int(b["rejected_mask"].sum()) for b in real),
                weight_total(chosen_lengths, objective.sft_reduction),
                len(real),
            ],
        )
        if num_pairs == 0:
            empty_micro_batches += len(batches)
            if empty_micro_batches >= sampler.batches_in_epoch(sampler_position(sampler, state.micro_batches)[0]):
                raise DataError(f"a whole epoch of pairs was skipped as bad; first problems: {state.skipped[:3]}")
            # Its pairs measured well but failed as they were built (an image that cannot be decoded): the step
            # passes without an update, so the step count and the schedule stay those planned.
            logger.warning("step %d: every pair of the step was skipped as bad; no update", state.step + 1)
            scheduler.step()
            state.step += 1
            progress.update(1)
            continue
        empty_micro_batches = 0

        # Metrics stay device tensors until a logging step; stage timing waits for the device, so only then.
        logging_step = is_logging_step(state.step + 1, train_args, total_steps)
        clock = stage_clock(logging_step)
        sums: dict[str, torch.Tensor] = {}
        timing = {"reference_s": 0.0, "policy_s": 0.0}
        policy_forward = accelerator.unwrap_model(forward)
        policy_forward.vit_seconds, policy_forward.time_stages = 0.0, logging_step
        for i, batch in enumerate(batches):
            with micro_batch(accelerator, forward, last=i == len(batches) - 1):
                if batch["num_pairs"] == 0:
                    # Nothing to train here (pairs skipped, or past the end of a packed epoch): a zero loss from a
                    # real forward keeps the ranks in step.
                    loss = idle_loss(forward, accelerator, tokenizer.pad_token_id, dummy_tile)
                    backward(accelerator, loss)
                    reference.idle(tokenizer.pad_token_id, dummy_tile, accelerator.device)  # a sharded one's gathers
                    if objective.needs_delta:
                        update_delta(running, accelerator, None)
                    continue
                start = clock(accelerator.device)
                policy = pair_logps(forward, batch, accelerator.device)
                timing["policy_s"] += clock(accelerator.device) - start
                start = clock(accelerator.device)
                ref_chosen, ref_rejected = reference(batch, accelerator.device)
                timing["reference_s"] += clock(accelerator.device) - start
                logps = (policy["chosen_logps"], policy["rejected_logps"], ref_chosen, ref_rejected)
                delta = None
                if objective.needs_delta:
                    delta = update_delta(running, accelerator, objective.rewards(*logps))
                # This micro-batch's share of the step's loss, normalised by the step's pairs and chosen tokens.
                out = objective(
                    *logps,
                    chosen_num_tokens=policy["chosen_num_tokens"],
                    rejected_num_tokens=policy["rejected_num_tokens"],
                    delta=delta,
                    num_pairs_in_step=num_pairs,
                    sft_weight_in_step=sft_weight,
                )
                # DDP averages gradients over ranks; multiplying by the world size makes it a global sum.
                loss = out.loss
                if aux_coef:
                    aux = policy_forward.aux_loss
                    sums["aux_loss"] = sums.get("aux_loss", 0.0) + aux.detach().double() / num_forwards
                    loss = loss + aux_coef * aux / num_forwards
                backward(accelerator, loss * accelerator.num_processes)
                pairs = batch["num_pairs"]
                for name, value in {
                    "loss": out.loss,
                    **{f"loss/{k}": v for k, v in out.terms.items()},
                    "rewards/chosen": out.chosen_rewards.sum(),
                    "rewards/rejected": out.rejected_rewards.sum(),
                    "rewards/accuracies": out.reward_accuracy * pairs,
                    "rewards/margins": out.reward_margin * pairs,
                    "logps/chosen": policy["chosen_logps"].sum(),
                    "logps/rejected": policy["rejected_logps"].sum(),
                }.items():
                    sums[name] = sums.get(name, 0.0) + value.detach().double()
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
            progress.set_postfix(loss=f"{last_loss:.4f}", acc=f"{totals.get('rewards/accuracies', 0) / num_pairs:.2f}")
            elapsed = time.perf_counter() - step_start
            metrics.write(
                state.step,
                {
                    "loss": last_loss,
                    **({"aux_loss": totals.get("aux_loss", float("nan"))} if aux_coef else {}),
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "epoch": epoch_progress(sampler, state.micro_batches),
                    **throughput_metrics(
                        accelerator,
                        batches,
                        elapsed,
                        num_samples=num_pairs,
                        num_loss_tokens=num_chosen_tokens + num_rejected_tokens,
                    ),
                    "num_truncated": state.num_truncated,
                    "vit_time_share": policy_forward.vit_seconds / elapsed,
                    # loss/* are already the step's values (shares summed); the rest are sums over its pairs.
                    **{
                        k: v if k.startswith("loss/") else v / num_pairs
                        for k, v in totals.items()
                        if k not in ("loss", "aux_loss")
                    },
                    "delta": float(running.mean),
                    "reference_time_share": timing["reference_s"] / elapsed,
                    "policy_forward_time_share": timing["policy_s"] / elapsed,
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
        extra={"final_loss": last_loss, "num_truncated": state.num_truncated, "delta": float(running.mean)},
    )
