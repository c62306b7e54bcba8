"""Online RL of InternVL (GSPO / GRPO, Cascade RL stage two): the whole loop, top to bottom.

Launch: `internvl-tune rl --config configs/rl/FILE.yaml [key=value ...]` (or under `accelerate launch` /
`torchrun`). The same shape, names and order as `sft.py` and `mpo.py`; a step is one rollout batch (docs/rl.md):

1. **Prompts**: rank r of W takes every W-th of the step's `rl.prompts_per_step` prompts (`PromptSet.for_step`: a
   fixed order, so a resumed run draws what the interrupted one would have).
2. **Rollouts**: `rl.num_generations` responses per prompt, prompts built as in training and eval, each request
   seeded by (seed, step, prompt), kept as token ids (the trained tokens are the sampled ones): from the policy
   itself (`rl.rollout_backend: hf`, in this process) or from a server (`server`: vLLM, SGLang, serve.py; the
   prompts built here, the server's prompt ids checked against them).
3. **Rewards** by `rl.rewards` (rewards.py, graded by judge.py), gathered over ranks; **advantages** per group
   (`group_advantages`), so 2 ranks compute what 1 does. With `rl.log_rollouts` the main process writes every
   response with its rewards and advantage to `rollouts/step_NNNNNN.jsonl`.
4. **Old log-probs**: the behaviour policy's, one no-grad pass in eval mode (as it sampled) over the step's rows
   before any update; with `rl.kl_coef` > 0 the reference's too.
5. **Updates**: `rl.ppo_epochs` passes over the step's mini-batches of `rl.mini_batch_size` prompts (over all
   ranks); each is one optimizer step, its loss normalised over the whole mini-batch on every rank
   (`loss_normalizer`), so micro-batching and ranks do not change it. Rows are `[prompt | r1 | ... | rk]`
   (`group_collate`): a group's image and prompt go through the model once per row. The schedule steps once per
   rollout step, as verl's.
6. **Weight push** (`server` only): the policy is saved into `rl.server_weights_dir` and the server reloads it, so
   the next step samples from the updated policy (also once at a resume: the server may hold older weights).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm

from internvl_tune.atomic import atomic_write_text
from internvl_tune.checkpoints.convert import is_original_checkpoint
from internvl_tune.checkpoints.read import resolve_dtype
from internvl_tune.config import ConfigError, RLConfig, to_dict
from internvl_tune.data.collate import group_collate
from internvl_tune.data.errors import DataError
from internvl_tune.data.images import blank_tile
from internvl_tune.errors import UserError
from internvl_tune.generation.base import GenerationRequest, SamplingParams
from internvl_tune.generation.hf import HFBackend, Rollout
from internvl_tune.generation.rollouts import PromptMismatch, ServerRollouts
from internvl_tune.generation.server import ServerBackend
from internvl_tune.losses.rl import RLLoss, group_advantages, loss_normalizer, policy_loss, rl_metrics
from internvl_tune.model.forward import InternVLTrainingForward
from internvl_tune.model.freeze import count_parameters
from internvl_tune.model.load import load_model
from internvl_tune.model.logprobs import group_token_logps
from internvl_tune.model.prepare import check_template, prepare_policy, sample_settings
from internvl_tune.model.reference import frozen_copy
from internvl_tune.preference_data.prompts import version_for_file, wrap_question
from internvl_tune.preference_data.resumable import derive_seed
from internvl_tune.preference_data.rl_prompts import Prompt, PromptSet
from internvl_tune.rewards import Rewards, RewardSpec
from internvl_tune.training.engine import backward, engine_name, micro_batch, prepare_reference
from internvl_tune.training.metrics import (
    MetricsWriter,
    is_logging_step,
    read_step_metrics,
    start_tracker,
    step_totals,
)
from internvl_tune.training.optim import prepare_optimization
from internvl_tune.training.saving import (
    finish_run,
    run_metadata,
    save_and_stop,
    save_model_folder,
    save_step_checkpoint,
)
from internvl_tune.training.session import StopRequest, prepare_output_dir, run_session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowSpec:
    """One training row: local prompt `group` of the step, its responses `[start, stop)`."""

    group: int
    start: int
    stop: int


def total_steps_of(config: RLConfig, num_prompts: int) -> int:
    """Rollout steps of the run: `train.max_steps`, or enough for `train.num_train_epochs` passes over the prompts."""
    if config.train.max_steps > 0:
        return config.train.max_steps
    return max(1, math.ceil(config.train.num_train_epochs * num_prompts / config.rl.prompts_per_step))


def check_layout(config: RLConfig, accelerator: Accelerator) -> None:
    """What the ranks must share: whole prompt counts per rank and per mini-batch; and, with the `hf` backend, whole
    weights on every rank (it generates in each rank's own process, one forward at a time, not collectively). With
    `server` no rank generates: FSDP2 and ZeRO shard the policy, and the push gathers it."""
    world, rl = accelerator.num_processes, config.rl
    if rl.mini_batch_size % world:
        raise ConfigError(
            f"rl.mini_batch_size={rl.mini_batch_size} must be a multiple of the {world} processes (each rank takes an "
            "equal share of every update's prompts)"
        )
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and rl.rollout_backend == "hf":
        raise ConfigError(
            f"rl.rollout_backend=hf generates in each rank's process, which needs the whole weights there: under "
            f"{engine_name(accelerator)} sample on a server (rl.rollout_backend=server, docs/rl.md), or train on one "
            "process or under DDP (configs/accelerate/ddp.yaml)"
        )


def check_server_folder(folder: str) -> None:
    """The server's folder must exist and hold the HF layout: the push writes that layout, and a server started on
    an original (remote-code) folder would reload weights under names it does not know."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"rl.server_weights_dir={folder}: no model folder there; copy the starting checkpoint there and start the "
            "server on it (docs/rl.md)"
        )
    if is_original_checkpoint(path):
        raise ConfigError(
            f"rl.server_weights_dir={folder} holds the original (remote-code) layout, and each push writes the HF "
            f"layout: serve an HF-layout copy instead (internvl-tune convert {folder} DIR --to hf)"
        )


def rollout_request(prompt: Prompt, config: RLConfig, step: int) -> GenerationRequest:
    """The sampling request of a prompt: its question asked by `rl.prompt_version` (`direct`: as it is), its images,
    G responses seeded by (seed, step, the prompt's place in the run's order)."""
    rl = config.rl
    question = prompt.record["question"]
    if rl.prompt_version != "direct":
        question = wrap_question(
            question, version_for_file(rl.prompt_version, prompt.where.rsplit(":", 1)[0]), len(prompt.images)
        )
    params = SamplingParams(
        n=rl.num_generations,
        temperature=rl.temperature,
        top_k=rl.top_k,
        top_p=rl.top_p,
        max_new_tokens=rl.max_new_tokens,
        seed=derive_seed(config.train.seed, "rl", step, prompt.index),
    )
    return GenerationRequest([{"role": "user", "content": question}], prompt.images, params)


def check_prompt_lengths(prompts: list[Prompt], rollouts: list[list[Rollout]], config: RLConfig) -> None:
    """A prompt must leave `rl.max_new_tokens` of `data.max_seq_length` (as verl's max_prompt_length): one line
    naming its file:line, never a silently cut prompt."""
    room = config.data.max_seq_length - config.rl.max_new_tokens
    for prompt, group in zip(prompts, rollouts, strict=True):
        length = len(group[0].prompt.input_ids)
        if length > room:
            raise DataError(
                f"{prompt.where}: the prompt is {length} tokens, more than data.max_seq_length - rl.max_new_tokens = "
                f"{room}; raise data.max_seq_length or shorten the prompt (fewer tiles: data.max_dynamic_patch)"
            )


def row_specs(groups: range, num_generations: int, responses_per_row: int | None) -> list[RowSpec]:
    """The rows of local prompts `groups`: each group's responses in rows of `responses_per_row` (None: one row)."""
    per_row = responses_per_row or num_generations
    return [
        RowSpec(g, start, min(start + per_row, num_generations))
        for g in groups
        for start in range(0, num_generations, per_row)
    ]


def group_inputs(rollouts: list[list[Rollout]], rows: list[RowSpec], num_image_token: int) -> list[dict[str, Any]]:
    """`group_collate`'s input for `rows`: the prompt's ids, positions and tiles once, the row's responses."""
    out = []
    for row in rows:
        prompt = rollouts[row.group][0].prompt
        out.append(
            {
                "prompt_ids": torch.tensor(prompt.input_ids, dtype=torch.long),
                "prompt_position_ids": prompt.position_ids,
                "pixel_values": prompt.pixel_values,
                "num_image_tokens": sum(prompt.num_tiles) * num_image_token,
                "responses": [
                    torch.tensor(r.response_ids, dtype=torch.long) for r in rollouts[row.group][row.start : row.stop]
                ],
            }
        )
    return out


def score_rollouts(
    rewards: Rewards, prompts: list[Prompt], rollouts: list[list[Rollout]], accelerator: Accelerator
) -> dict[str, torch.Tensor]:
    """Every rank's rewards, terms, lengths and cut responses, gathered: {name: [P_all, G]} float64 on the CPU, the
    rows of rank r at [r * P_local, (r + 1) * P_local). Group statistics (advantages, zero-variance groups, the
    batch std) then see the whole step on every rank."""
    values = []
    for prompt, group in zip(prompts, rollouts, strict=True):
        row = []
        for r in group:
            terms = rewards.terms(r.text, len(r.response_ids), prompt.record)
            row.append([rewards.total(terms), len(r.response_ids), float(r.truncated), *terms.values()])
        values.append(row)
    local = torch.tensor(values, dtype=torch.float64, device=accelerator.device)  # [P, G, 3 + terms]
    gathered = accelerator.gather(local).cpu() if accelerator.num_processes > 1 else local.cpu()
    names = ["reward", "length", "truncated", *(f"reward/{n}" for n in rewards.spec.names)]
    return {name: gathered[..., i] for i, name in enumerate(names)}


def rollout_metrics(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's rollout metrics (docs/metrics.md): reward mean and std, each term's mean, accuracy, response
    lengths, the share of responses cut at max_new_tokens, and of groups whose rewards are all equal (advantage 0:
    nothing learnt from them)."""
    reward, length = scores["reward"], scores["length"]
    out = {
        "reward/mean": float(reward.mean()),
        "reward/std": float(reward.std(correction=0)),
        **{name: float(v.mean()) for name, v in scores.items() if name.startswith("reward/")},
        "response_length/mean": float(length.mean()),
        "response_length/max": float(length.max()),
        "response_length/min": float(length.min()),
        "truncated_share": float(scores["truncated"].mean()),
        "zero_variance_groups": float((reward.max(-1).values == reward.min(-1).values).double().mean()),
    }
    if "reward/accuracy" in scores:
        out["accuracy"] = out["reward/accuracy"]
    return out


def rollout_records(
    step: int,
    prompts: list[Prompt],
    rollouts: list[list[Rollout]],
    scores: dict[str, torch.Tensor],
    advantages: torch.Tensor,
    first_group: int,
) -> list[dict[str, Any]]:
    """This rank's lines of the step's rollout log (`rl.log_rollouts`): one per response. Its prompts are the step's
    groups `first_group, first_group + 1, ...` of the gathered `scores` and `advantages` ([P_all, G])."""
    terms = [name for name in scores if name.startswith("reward/")]
    records = []
    for offset, (prompt, group) in enumerate(zip(prompts, rollouts, strict=True)):
        row = first_group + offset
        for index, rollout in enumerate(group):
            records.append(
                {
                    "step": step,
                    "prompt": prompt.where,
                    "prompt_index": prompt.index,
                    "response_index": index,
                    "question": prompt.record.get("question"),
                    "answer": prompt.record.get("answer"),
                    "response": rollout.text,
                    "num_tokens": len(rollout.response_ids),
                    "truncated": rollout.truncated,
                    "reward": float(scores["reward"][row, index]),
                    "rewards": {name.removeprefix("reward/"): float(scores[name][row, index]) for name in terms},
                    "advantage": float(advantages[row, index]),
                }
            )
    return records


def write_rollout_log(accelerator: Accelerator, folder: Path, step: int, records: list[dict[str, Any]]) -> None:
    """Every rank's records of a step, in the run's prompt order (whatever the number of ranks), written by the main
    process to `folder/step_NNNNNN.jsonl` (atomically: a resumed run that replays the step replaces the file whole)."""
    if accelerator.num_processes > 1:
        records = gather_object(records)
    if accelerator.is_main_process:
        records = sorted(records, key=lambda r: (r["prompt_index"], r["response_index"]))
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        atomic_write_text(folder / f"step_{step:06d}.jsonl", text)


class WeightPush:
    """Save the policy into the server's folder and have the server reload it (`rl.rollout_backend: server`)."""

    def __init__(self, client: ServerBackend, rl, metadata: dict[str, Any], config: RLConfig):
        self.client, self.kind = client, rl.server_kind
        self.folder = Path(rl.server_weights_dir)
        self.metadata = metadata
        self.dtype = resolve_dtype(config.train.save_dtype, config.model.model_name_or_path)

    def __call__(self, accelerator: Accelerator, forward: torch.nn.Module, tokenizer) -> None:
        save_model_folder(accelerator, forward, tokenizer, self.folder, self.metadata, dtype=self.dtype)
        if accelerator.is_main_process:
            self.client.reload_weights(self.folder, kind=self.kind)
        accelerator.wait_for_everyone()  # no rank samples before the server has the new weights


def sampler_logps(rollouts: list[list[Rollout]], rows: list[RowSpec]) -> torch.Tensor | None:
    """The sampler's log-probs of `rows`' response tokens in `group_collate` order (float64 [K]), or None unless
    every response has them (a server that sends log-probs)."""
    values = []
    for row in rows:
        for r in rollouts[row.group][row.start : row.stop]:
            if r.sampler_logps is None:
                return None
            values += r.sampler_logps
    return torch.tensor(values, dtype=torch.float64)


def token_logps_no_grad(
    forward: torch.nn.Module, batch: dict[str, Any], device, *, temperature: float, with_entropy: bool = False
):
    """Per-token log-probs of a row batch at `temperature` without gradients, in eval mode (the mode the rollouts
    sampled in); `with_entropy`: and each token's next-token entropy (the pair)."""
    was_training = forward.training
    forward.eval()
    try:
        with torch.no_grad():
            out = group_token_logps(forward, batch, device, with_entropy=with_entropy, temperature=temperature)
    finally:
        forward.train(was_training)
    return tuple(t.float() for t in out) if with_entropy else out.float()


def train(config: RLConfig) -> dict[str, Any]:
    """Run online RL as configured; returns a summary (final loss and reward, steps, paths). Raises
    `TrainingInterrupted` after saving a checkpoint when stopped by SIGINT / SIGTERM."""
    with run_session(config.train) as accelerator, StopRequest() as stop, contextlib.ExitStack() as cleanup:
        return _train(config, accelerator, stop, cleanup)


def _train(
    config: RLConfig, accelerator: Accelerator, stop: StopRequest, cleanup: contextlib.ExitStack
) -> dict[str, Any]:
    model_args, data_args, train_args, rl = config.model, config.data, config.train, config.rl
    set_seed(train_args.seed)
    check_layout(config, accelerator)
    output_dir, resume_dir = prepare_output_dir(accelerator, train_args)
    world, rank = accelerator.num_processes, accelerator.process_index
    loss_settings = RLLoss(**rl.loss_settings())
    rewards = Rewards(
        RewardSpec(tuple(rl.rewards), tuple(rl.reward_weights), rl.prompt_version, rl.max_new_tokens, rl.length_buffer)
    )

    # Model: load, then the original order of DropPath, freezing, LoRA, checkpointing.
    check_template(data_args, model_args.model_name_or_path)
    model, tokenizer = prepare_policy(model_args)
    num_trainable, num_total = count_parameters(model)
    settings = sample_settings(data_args, model.config)
    dummy_tile = blank_tile(settings.image_size, settings.normalize_type)
    prompts = PromptSet(data_args.meta_path, seed=train_args.seed)
    total_steps = total_steps_of(config, len(prompts))
    warmup_steps = math.ceil(train_args.warmup_ratio * total_steps)

    reference = None
    if rl.kl_coef > 0:  # a frozen copy, placed as the policy is
        reference_model, _ = load_model(
            model_args.model_name_or_path,
            dtype=torch.bfloat16 if train_args.bf16 else torch.float32,
            attn_implementation=model_args.attn_implementation,
        )
        reference = prepare_reference(accelerator, frozen_copy(reference_model))

    uses_lora = bool(model_args.use_llm_lora or model_args.use_backbone_lora)
    forward, optimizer, scheduler, state = prepare_optimization(
        accelerator,
        InternVLTrainingForward(model),
        model_args,
        train_args,
        total_steps,
        warmup_steps,
        uses_lora=uses_lora,
        resume_dir=resume_dir,
    )
    order = {"prompts": len(prompts), "prompts_per_step": rl.prompts_per_step, "seed": train_args.seed}
    if state.data_order is not None and state.data_order != order and train_args.resume_data_check:
        raise ConfigError(
            f"the prompt order differs from the checkpoint's ({state.data_order} -> {order}): the rollouts after the "
            "resume would not be the interrupted run's; restore the data and settings, or set "
            "train.resume_data_check=false"
        )
    state.data_order = order
    policy_forward = accelerator.unwrap_model(forward)
    if rl.rollout_backend == "server":
        check_server_folder(rl.server_weights_dir)
        client = ServerBackend(
            rl.server_url,
            model_name=rl.server_model,
            api_key=os.environ.get("INTERNVL_TUNE_API_KEY"),  # None: ServerBackend reads $OPENAI_API_KEY
            max_concurrency=rl.server_concurrency,
        )
        backend: HFBackend | ServerRollouts = ServerRollouts(client, tokenizer, settings)
        push = WeightPush(client, rl, run_metadata(accelerator, forward, config, settings), config)
        if state.step > 0:  # a resumed run: the server may still hold the weights it started with
            push(accelerator, forward, tokenizer)
    else:
        # Rollouts from the policy's own parameters: every update is seen by the next step's generation, no push.
        backend = HFBackend(policy_forward.model, tokenizer, settings, batch_size=rl.rollout_batch_size)
        push = None
    local_prompts = rl.prompts_per_step // world
    mini_batches = [
        range(start, start + rl.mini_batch_size // world)
        for start in range(0, local_prompts, rl.mini_batch_size // world)
    ]

    tracker = start_tracker(accelerator, train_args.report_to, output_dir, to_dict(config), state.step)
    metrics = MetricsWriter(output_dir, enabled=accelerator.is_main_process, start_step=state.step, tracker=tracker)
    if accelerator.is_main_process:
        (output_dir / "config.resolved.json").write_text(json.dumps(to_dict(config), indent=2, ensure_ascii=False))
        logger.info(
            "trainable parameters %d of %d; %d prompts; %d steps of %d prompts x %d responses, %d updates each",
            num_trainable,
            num_total,
            len(prompts),
            total_steps,
            rl.prompts_per_step,
            rl.num_generations,
            len(mini_batches) * rl.ppo_epochs,
        )
    progress = cleanup.enter_context(
        tqdm(total=total_steps, initial=state.step, desc="rl", disable=not accelerator.is_main_process)
    )
    device = accelerator.device
    # Log-probs of the distribution the responses were sampled from, logits / rl.temperature, as verl's actor and
    # TRL's GRPOTrainer score them (greedy, temperature 0, is a single response: scored at 1).
    temperature = rl.temperature or 1.0
    forward.train()
    last_loss = last_reward = float("nan")
    while state.step < total_steps:
        if stop.requested(accelerator):  # Ctrl-C or SIGTERM: save this step boundary and exit
            progress.close()
            save_and_stop(accelerator, state, train_args)
        step_start = time.perf_counter()

        # 1-2. This rank's prompts and their responses.
        step_prompts = prompts.for_step(state.step, rl.prompts_per_step, rank, world)
        with accelerator.autocast():  # the precision the updates run in (train.bf16)
            try:
                rollouts = backend.rollout([rollout_request(p, config, state.step) for p in step_prompts])
            except PromptMismatch as e:
                raise DataError(f"{step_prompts[e.index].where}: {e}") from None
        check_prompt_lengths(step_prompts, rollouts, config)
        rollout_s = time.perf_counter() - step_start

        # 3. Rewards and advantages over the whole step (all ranks).
        scores = score_rollouts(rewards, step_prompts, rollouts, accelerator)
        try:
            advantages_all = group_advantages(scores["reward"], **rl.advantage_settings())
        except ValueError as e:  # scale_rewards=mean and a negative reward (a user reward's)
            raise UserError(f"step {state.step + 1}: rl.{e}") from None
        advantages = advantages_all[rank * local_prompts : (rank + 1) * local_prompts].float()  # [P_local, G]
        if rl.log_rollouts:
            records = rollout_records(
                state.step + 1, step_prompts, rollouts, scores, advantages_all, rank * local_prompts
            )
            write_rollout_log(accelerator, output_dir / "rollouts", state.step + 1, records)

        # 4. The rows of each mini-batch, their old (and reference) log-probs: one no-grad pass before any update.
        score_start = time.perf_counter()
        plan = []  # per mini-batch: [(batch, old, ref, advantages)] per micro-batch, and the mini-batch normalizer
        entropy_sums = torch.zeros(2, dtype=torch.float64, device=device)  # [sum over response tokens, tokens]
        mismatch = torch.zeros(3, dtype=torch.float64, device=device)  # |sampler - trainer| log-prob: sum, n, max
        for groups in mini_batches:
            rows = row_specs(groups, rl.num_generations, rl.responses_per_row)
            micro = []
            lengths: list[int] = []
            for first in range(0, len(rows), train_args.per_device_train_batch_size):
                chunk = rows[first : first + train_args.per_device_train_batch_size]
                batch = group_collate(
                    group_inputs(rollouts, chunk, settings.num_image_token), tokenizer.pad_token_id, dummy_tile
                )
                # Through the prepared forward, as the updates: the same autocast, so a first update's ratio is 1.
                old, entropy = token_logps_no_grad(forward, batch, device, temperature=temperature, with_entropy=True)
                entropy_sums += torch.stack([entropy.double().sum(), torch.tensor(entropy.numel(), device=device)])
                sampler = sampler_logps(rollouts, chunk)
                if sampler is not None:  # the server's log-probs of the tokens it sampled: how far the trainer's are
                    gap = (sampler.to(device) - old.double()).abs()
                    mismatch[:2] += torch.stack([gap.sum(), torch.tensor(gap.numel(), device=device)])
                    mismatch[2] = torch.maximum(mismatch[2], gap.max())
                ref = None
                if reference is not None:
                    ref = token_logps_no_grad(reference, batch, device, temperature=temperature)
                adv = torch.cat([advantages[r.group, r.start : r.stop] for r in chunk]).to(device)
                micro.append((batch, old, ref, adv))
                lengths += batch["response_lengths"].tolist()
            # The mini-batch's denominator over every rank: each micro-batch's loss is then its share of the update's.
            (normalizer,) = step_totals(
                accelerator, [loss_normalizer(lengths, loss_settings.loss_agg_mode, loss_settings.norm_length)]
            )
            plan.append((micro, normalizer))
        score_s = time.perf_counter() - score_start

        # 5. Policy updates: ppo_epochs passes over the mini-batches, one optimizer step each.
        update_start = time.perf_counter()
        logging_step = is_logging_step(state.step + 1, train_args, total_steps)
        sums: dict[str, torch.Tensor] = {}
        extremes = torch.full((2,), -math.inf, dtype=torch.float64, device=device)  # [ratio max, -ratio min]
        grad_norms: list[torch.Tensor] = []
        for _ in range(rl.ppo_epochs):
            for micro, normalizer in plan:
                for i, (batch, old, ref, adv) in enumerate(micro):
                    with micro_batch(accelerator, forward, last=i == len(micro) - 1):
                        logp = group_token_logps(forward, batch, device, temperature=temperature)
                        out = policy_loss(
                            logp,
                            old,
                            adv,
                            settings=loss_settings,
                            seq_ids=batch["response_of_token"].to(device),
                            ref_logp=ref,
                            normalizer=normalizer,
                        )
                        # DDP averages gradients over ranks; multiplying by the world size makes it a global sum.
                        backward(accelerator, out.loss * world)
                    for name, value in {"loss": out.loss, **{f"loss/{k}": v for k, v in out.terms.items()}}.items():
                        sums[name] = sums.get(name, 0.0) + value.detach().double()
                    for name, value in out.stats.items():
                        sums[f"stats/{name}"] = sums.get(f"stats/{name}", 0.0) + value.double()
                    extremes = torch.maximum(extremes, torch.stack([out.ratio_max, -out.ratio_min]).double())
                if train_args.max_grad_norm > 0:
                    grad_norms.append(accelerator.clip_grad_norm_(forward.parameters(), train_args.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        state.step += 1
        progress.update(1)
        update_s = time.perf_counter() - update_start
        push_start = time.perf_counter()
        if push is not None and state.step < total_steps:  # the last step's weights go to final/ only
            push(accelerator, forward, tokenizer)
        push_s = time.perf_counter() - push_start

        if logging_step:
            extra_sums = {"entropy_sum": entropy_sums[0], "entropy_n": entropy_sums[1]}
            extra_sums |= {"mismatch_sum": mismatch[0], "mismatch_n": mismatch[1]}
            totals = read_step_metrics(accelerator, {**sums, **extra_sums})
            mismatch_max = accelerator.gather(mismatch[2:]).max() if world > 1 else mismatch[2]
            if world > 1:
                extremes = accelerator.gather(extremes[None]).max(0).values
            num_updates = len(plan) * rl.ppo_epochs
            stats = {k.removeprefix("stats/"): torch.tensor(v) for k, v in totals.items() if k.startswith("stats/")}
            rollout_stats = rollout_metrics(scores)
            last_loss, last_reward = totals["loss"] / num_updates, rollout_stats["reward/mean"]
            elapsed = time.perf_counter() - step_start
            progress.set_postfix(loss=f"{last_loss:.4f}", reward=f"{last_reward:.3f}")
            metrics.write(
                state.step,
                {
                    "loss": last_loss,  # the mean of the step's updates' losses
                    **{k: v / num_updates for k, v in totals.items() if k.startswith("loss/")},
                    "lr": scheduler.get_last_lr()[0],
                    # a tensor, or a float under DeepSpeed (its norm of the step it just took)
                    "grad_norm": sum(float(g) for g in grad_norms) / len(grad_norms) if grad_norms else None,
                    "epoch": prompts.epoch_of(state.step, rl.prompts_per_step),
                    **rollout_stats,
                    "advantage/abs_mean": float(advantages_all.abs().mean()),
                    # the behaviour policy's next-token entropy, token mean over the step's response tokens
                    "entropy": totals["entropy_sum"] / max(totals["entropy_n"], 1.0),
                    **(
                        {
                            "sampler_logp_gap/mean": totals["mismatch_sum"] / totals["mismatch_n"],
                            "sampler_logp_gap/max": float(mismatch_max),
                        }
                        if totals["mismatch_n"]
                        else {}
                    ),
                    **{k: float(v) for k, v in rl_metrics(stats).items()},
                    "ratio_max": float(extremes[0]),
                    "ratio_min": float(-extremes[1]),
                    "num_responses": int(scores["reward"].numel()),
                    "responses_per_s": scores["reward"].numel() / elapsed,
                    "update_responses_per_s": scores["reward"].numel() * rl.ppo_epochs / max(update_s, 1e-9),
                    "rollout_time_share": rollout_s / elapsed,
                    "old_logp_time_share": score_s / elapsed,
                    "update_time_share": update_s / elapsed,
                    "push_time_share": push_s / elapsed,
                    "step_time_s": elapsed,
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
        extra={"final_loss": last_loss, "final_reward": last_reward},
    )
