"""One online-RL policy update (GSPO), side by side: our group rows, G separate rows, and TRL's `GRPOTrainer`.

Run (CPU here; on a GPU add `--device cuda --bf16`, and `--preset internvl2_5-1b` for real shapes)::

    .venv/bin/pip install trl==1.16.0       # benchmark-only dependency
    .venv/bin/python benchmarks/rl_step.py  # writes benchmarks/RESULTS-rl.md
    .venv/bin/python benchmarks/rl_step.py --device cuda --bf16 --preset internvl2_5-1b --profile

What is compared: the update, rollouts excluded. Every configuration trains the same random InternVL (the model
folders of `common.py`; the default is the small model with the real 151,674-token vocabulary) on the same fixed,
pre-generated rollouts: per step `--prompts-per-step` prompts (an image cut into 6 tiles + thumbnail and a question,
rendered by our template up to the assistant's first token, as a rollout's prompt), each with `--num-generations`
G = 16 responses of `--answer-tokens` = 300 token ids (fixed, ending with `<|im_end|>`), fixed rewards (response j
of a group: 1 if j % 3 == 0, else 0, so advantages are nonzero) and fixed old log-probs (one forward of the initial
policy over every rollout, made once by a child process before the runs, not timed, used by every configuration).
One step = one optimizer step on one step's groups: forward, GSPO loss, backward, clipping 1.0, AdamW (the MPO
stage's lr 1e-6 and weight decay 0.05, cosine schedule, no warm-up), gradient checkpointing, no DropPath.

- `shared`:   our pieces as the RL recipe chains them: `group_collate` (one row `[prompt | r1 | ... | rG]` per
  prompt, the ViT once per image) -> `InternVLTrainingForward` (the LM head on the response positions only) ->
  `group_token_logps` -> `policy_loss` with `RLArgs`' defaults (gspo, seq-mean-token-mean, clip 0.2 / 0.2, verl
  conventions, no KL) -> backward -> step: the update of recipes/rl.py, without its rollouts and old log-probs.
- `separate`: the same loop on G separate rows `[prompt | rj]` per prompt (single-response `group_collate` groups),
  every tile G times: the layout TRL uses, through our forward and loss, to show where the gain comes from.
- `trl`:      `trl.GRPOTrainer` with `importance_sampling_level="sequence"` (GSPO), `loss_type="grpo"`, epsilon
  0.2 / epsilon_high 0.2, beta 0 (no reference model), `num_generations` G, `steps_per_generation` 1,
  `num_iterations` 1. Rollouts are excluded by one override: `_generate_and_score_completions` (TRL's generation
  and scoring step, which returns the batch `_compute_loss` reads) returns the fixed rollout of the step, laid out as
  TRL lays out its own: G rows `prompt + completion` per prompt, the prompt's tiles once per row, `num_tiles` per
  row, advantages, and the same old log-probs as `old_per_token_logps`. Everything after it is TRL's own
  (`_prepare_inputs` shuffling and splitting, `_compute_loss`, the fused LM head, which also computes entropies for
  its metrics, the Trainer's backward, clipping and step).

Loss mapping. Our `seq-mean-token-mean` (each response's token mean, then the mean over responses) is TRL's
`loss_type="grpo"`: `((per_token_loss * mask).sum(-1) / mask.sum(-1)).mean()` over the micro-batch, here the whole
step (one micro-batch, no accumulation). With `importance_sampling_level="sequence"` TRL's ratio is
`exp(mean_t(logp - old))` per response, and the token loss `-min(s A, clip(s, 1 - eps, 1 + eps_high) A)`, which is
ours; verl's straight-through per-token form has the same values and gradients (docs/losses.md, "Online RL"). The
one difference is the advantage's std epsilon: TRL gets advantages by its own rule (1e-4, `conventions="trl"` of
`group_advantages`, TRL's formula), ours verl's 1e-6, a relative difference of 1e-4 / std = 2e-4 here. The step-1
ratio is 1 in both (old = the initial policy), so the step-1 loss is -mean(A) = 0 up to rounding in every row; the
correctness check of the comparison is therefore the step-1 gradient norm (before clipping; TRL logs it), which
depends on every response token's log-prob gradient and the advantages: it must agree within 1% between the
configurations. The step-2 loss (after one update, ratios no longer 1) is reported as well.

How it is measured (as `mpo_step.py`): each configuration runs in its own process, `--warmup-steps` untimed steps,
then `--timed-steps` timed ones (with `--profile`, two more: `common.StepProfiler`). responses/s = responses of the
timed steps / their wall time (ours: from the end of the last warm-up step to the end of the last timed one, the
device synchronised at both ends; TRL: between `on_step_end` callbacks), collation included. Counted FLOPs per
response follow `common.py`'s rules; each layout is credited with its own work (the group row counts the prompt and
its tiles once per group, the separate rows and TRL once per response). Peak memory: `max_memory_allocated` on a
GPU; on CPU the peak RSS (VmHWM) of the timed run and, unless `--no-memory-runs`, of a second 3-step run with a fixed
malloc threshold (`common.FIXED_MALLOC`, the memory actually held).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402 (a sibling script module, not a package)
from common import QUESTION, SEED, Work, causal_pairs, mib  # noqa: E402

CONFIGS = ("shared", "separate", "trl")
LABELS = {
    "shared": "ours, one group row per prompt",
    "separate": "ours, G separate rows",
    "trl": "TRL GRPOTrainer (sequence level)",
}
# Steps a CPU memory run takes (1 warm-up + 2 timed: Adam's states exist from step 1); rollouts are made for them too.
MEMORY_RUN_STEPS = 3
# Gradient norms of the configurations must agree within this share for the comparison to count (module docstring).
GRAD_NORM_TOLERANCE = 0.01


def reward_of(j: int) -> float:
    """The fixed reward of response j of a group: 1 for every third one (6 of 16), else 0."""
    return 1.0 if j % 3 == 0 else 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p, configs=CONFIGS, workdir="/tmp/internvl_tune_rl_bench", answer_tokens=300)
    # TRL's step on 16 rows of ~2,100 tokens takes minutes on a 2-core CPU: fewer steps than the other benchmarks.
    p.set_defaults(warmup_steps=1, timed_steps=2)
    p.add_argument("--num-generations", type=int, default=16, help="responses per prompt, G")
    p.add_argument("--prompts-per-step", type=int, default=1)
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS-rl.md"), help="'' = do not write")
    p.add_argument(
        "--no-memory-runs",
        dest="memory_runs",
        action="store_false",
        help="CPU: skip the second, memory-only run per configuration (fixed malloc threshold)",
    )
    p.add_argument("--child", choices=(*CONFIGS, "old-logps"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.num_generations < 2:
        p.error("--num-generations must be >= 2 (a group of one has no advantage under TRL's rule)")
    if args.prompts_per_step < 1 or args.answer_tokens < 2:
        p.error("--prompts-per-step must be >= 1 and --answer-tokens >= 2")
    common.finish_common_args(p, args, CONFIGS)
    args.rollout_steps = max(args.steps, MEMORY_RUN_STEPS)
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The workload: a model folder, images and questions, fixed responses and rewards (parent), old log-probs (a child).


def build_workload(args: argparse.Namespace, workdir: Path) -> dict[str, Path]:
    """The model folder (cached per shape), the prompts' images + meta.json, and rollouts.pt: per group the G response
    token ids and rewards."""
    import torch
    from transformers import AutoTokenizer

    model_dir = common.model_dir_for(args.shape, args.models, args.bf16)
    num_groups = args.prompts_per_step * args.rollout_steps
    # PairBuilder renders the prompt; chosen / rejected only have to be valid, different answers.
    records = [
        {"image": f"{i}.png", "question": QUESTION, "chosen": "Yes.", "rejected": "No."} for i in range(num_groups)
    ]
    meta = common.write_dataset(workdir / "data", records)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    n = args.answer_tokens
    responses, rewards = [], []
    for i in range(num_groups):
        group = []
        for j in range(args.num_generations):
            text = common.answer_of_tokens(tokenizer, i * args.num_generations + j, n)
            ids = tokenizer(text, add_special_tokens=False).input_ids[: n - 1] + [end]
            group.append(torch.tensor(ids, dtype=torch.long))
        responses.append(group)
        rewards.append([reward_of(j) for j in range(args.num_generations)])
    rollouts = workdir / "rollouts.pt"
    torch.save({"responses": responses, "rewards": torch.tensor(rewards)}, rollouts)
    return {"model_dir": model_dir, "meta": meta, "rollouts": rollouts}


def load_groups(args: argparse.Namespace) -> tuple[list[dict[str, Any]], Any, Any]:
    """The rollouts as `group_collate` groups (prompt as our PairBuilder makes it, the fixed responses), their rewards
    [num_groups, G], and the data settings."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from internvl_tune.config import DataArgs
    from internvl_tune.data.dataset import RecordDataset
    from internvl_tune.data.preference import PairBuilder
    from internvl_tune.data.transform import SampleBuilder
    from internvl_tune.model.prepare import sample_settings

    workdir = Path(args.workdir)
    model_dir = common.model_dir_for(args.shape, args.models, args.bf16)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    data = DataArgs(
        meta_path=str(workdir / "data" / "meta.json"), max_dynamic_patch=args.max_dynamic_patch, max_seq_length=32768
    )
    settings = sample_settings(data, AutoConfig.from_pretrained(model_dir, local_files_only=True))
    prompts = RecordDataset(
        data.meta_path, PairBuilder(SampleBuilder(tokenizer, settings)), seed=SEED, require_data_augment=False
    )
    rollouts = torch.load(workdir / "rollouts.pt")
    groups = []
    for i, responses in enumerate(rollouts["responses"]):
        s = prompts[i]
        groups.append(
            {
                "prompt_ids": s["prompt_ids"],
                "prompt_position_ids": s["prompt_position_ids"],
                "pixel_values": s["pixel_values"],
                "num_image_tokens": s["num_image_tokens"],
                "responses": responses,
            }
        )
    return groups, rollouts["rewards"], settings


def step_groups(args: argparse.Namespace, groups: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    return groups[step * args.prompts_per_step : (step + 1) * args.prompts_per_step]


def describe_rollouts(args: argparse.Namespace) -> dict[str, Any]:
    """Token and tile counts per group (the first group: all are alike) and each configuration's counted FLOPs per
    response (one trained pass; no reference pass, beta 0)."""
    groups, _, _ = load_groups(args)
    g = groups[0]
    tiles, prompt = len(g["pixel_values"]), len(g["prompt_ids"])
    lengths = [len(r) for r in g["responses"]]
    scored = sum(lengths)
    shared = Work(tiles, prompt + scored, common.group_row_pairs(prompt, lengths), scored)
    separate = Work(
        tiles * len(lengths), sum(prompt + n for n in lengths), sum(causal_pairs(prompt + n) for n in lengths), scored
    )
    per_response = {
        "shared": common.step_flops(args.shape, shared) / len(lengths),
        "separate": common.step_flops(args.shape, separate) / len(lengths),
    }
    per_response["trl"] = per_response["separate"]  # the same rows
    return {
        "tiles": tiles,
        "image_tokens": g["num_image_tokens"],
        "prompt_tokens": prompt,
        "response_tokens": lengths[0],
        "num_generations": len(lengths),
        "flops_per_response": per_response,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Ours: the update as the RL recipe chains our pieces.


def our_policy(args: argparse.Namespace):
    """The policy as our recipes prepare it, wrapped in the training forward, on the device."""
    import torch

    from internvl_tune.config import ModelArgs
    from internvl_tune.model.forward import InternVLTrainingForward
    from internvl_tune.model.prepare import prepare_policy

    torch.manual_seed(SEED)
    model, _ = prepare_policy(
        ModelArgs(
            model_name_or_path=str(common.model_dir_for(args.shape, args.models, args.bf16)),
            attn_implementation=args.attn_implementation,
            grad_checkpoint=args.grad_checkpoint,
            drop_path_rate=0.0,  # TRL's model has no DropPath; the same math on both sides
        )
    )
    return InternVLTrainingForward(model.to(args.device))


def collate_step(args: argparse.Namespace, groups: list[dict[str, Any]], layout: str, settings) -> dict[str, Any]:
    """One step's batch: a row per group (`shared`), or a row per response (`separate`, single-response groups in
    the same order, so tokens and responses are numbered alike)."""
    from internvl_tune.data.collate import group_collate
    from internvl_tune.data.images import blank_tile

    if layout == "separate":
        groups = [{**g, "responses": [r]} for g in groups for r in g["responses"]]
    return group_collate(groups, 0, blank_tile(settings.image_size, settings.normalize_type))


def autocast(args: argparse.Namespace):
    import torch

    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)


def compute_old_logps(args: argparse.Namespace) -> dict[str, Any]:
    """The initial policy's log-prob of every response token of every step, [K] per step (group, response, token
    order), saved for all configurations. Not timed."""
    import torch

    from internvl_tune.model.logprobs import group_token_logps

    groups, _, settings = load_groups(args)
    forward = our_policy(args)
    forward.eval()
    old = []
    with torch.no_grad(), autocast(args):
        for step in range(args.rollout_steps):
            batch = collate_step(args, step_groups(args, groups, step), "shared", settings)
            old.append(group_token_logps(forward, batch, args.device).float().cpu())
    torch.save(old, Path(args.workdir) / "old_logps.pt")
    return {}


def run_ours(args: argparse.Namespace, layout: str) -> dict[str, Any]:
    import torch

    from internvl_tune.config import MPOConfig, RLArgs
    from internvl_tune.losses.rl import RLLoss, group_advantages, loss_normalizer, policy_loss
    from internvl_tune.model.logprobs import group_token_logps
    from internvl_tune.training.optim import build_optimizer, build_scheduler

    groups, rewards, settings = load_groups(args)
    old_logps = torch.load(Path(args.workdir) / "old_logps.pt")
    rl = RLArgs(num_generations=args.num_generations)
    loss_settings = RLLoss(**rl.loss_settings())
    advantages = group_advantages(rewards, **rl.advantage_settings())  # [num_groups, G]
    train = MPOConfig().train  # the RL stage continues from MPO with its optimizer settings
    forward = our_policy(args)
    optimizer = build_optimizer(
        forward,
        lr=train.learning_rate,
        weight_decay=train.weight_decay,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_epsilon,
    )
    scheduler = build_scheduler(optimizer, kind=train.lr_scheduler_type, warmup_steps=0, total_steps=args.steps)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    forward.train()
    losses, grad_norms, step_ends = [], [], []
    window_start = time.perf_counter()
    for step in range(args.steps):
        batch = collate_step(args, step_groups(args, groups, step), layout, settings)
        first = step * args.prompts_per_step
        with autocast(args):
            logps = group_token_logps(forward, batch, device)  # [K]
        out = policy_loss(
            logps,
            old_logps[step].to(device, non_blocking=True),
            advantages[first : first + args.prompts_per_step].reshape(-1).to(device, non_blocking=True),
            settings=loss_settings,
            seq_ids=batch["response_of_token"].to(device, non_blocking=True),
            # From the collator's CPU counts, as a recipe passes it: the default reads the device's counts back.
            normalizer=loss_normalizer(
                batch["response_lengths"], loss_settings.loss_agg_mode, loss_settings.norm_length
            ),
        )
        out.loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(forward.parameters(), train.max_grad_norm).detach())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
        if step == args.warmup_steps - 1 or step == args.warmup_steps + args.timed_steps - 1:
            sync()  # the timed window's ends only: no host wait inside it
        step_ends.append(time.perf_counter())
        if step == args.warmup_steps - 1:
            window_start = step_ends[-1]
    timed_s = step_ends[args.warmup_steps + args.timed_steps - 1] - window_start
    responses = args.prompts_per_step * args.num_generations
    return {
        "step_times_s": [b - a for a, b in zip(step_ends, step_ends[1:], strict=False)],
        "responses_per_s": responses * args.timed_steps / timed_s,
        "losses": [float(x) for x in losses],
        "grad_norms": [float(x) for x in grad_norms],
    }


# ----------------------------------------------------------------------------------------------------------------------
# TRL: GRPOTrainer on the same rollouts.


def trl_batch(args: argparse.Namespace, groups, old_logps, advantages, pad_token_id: int, device) -> dict[str, Any]:
    """One step's rollouts as TRL's generation step returns them: G rows per prompt, prompts left-padded and
    completions right-padded (all alike here, so no padding), the prompt's tiles once per row.

    Example, one prompt [p0, p1] with 1 tile t and G = 2 completions [a0, a1], [b0, b1]::

        prompt_ids [[p0, p1], [p0, p1]]   completion_ids [[a0, a1], [b0, b1]]   pixel_values [t, t]   num_tiles [1, 1]
    """
    import torch
    from torch.nn.utils.rnn import pad_sequence

    rows = [(g, r) for g in groups for r in g["responses"]]
    prompt_length = max(len(g["prompt_ids"]) for g, _ in rows)
    prompt_ids = torch.full((len(rows), prompt_length), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, (g, _) in enumerate(rows):
        prompt_ids[i, prompt_length - len(g["prompt_ids"]) :] = g["prompt_ids"]
        prompt_mask[i, prompt_length - len(g["prompt_ids"]) :] = 1
    completions = [r for _, r in rows]
    completion_ids = pad_sequence(completions, batch_first=True, padding_value=pad_token_id)
    completion_mask = pad_sequence([torch.ones_like(r) for r in completions], batch_first=True)
    old = pad_sequence(list(old_logps.split([len(r) for r in completions])), batch_first=True)
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum(),
        "old_per_token_logps": old,
        "pixel_values": torch.cat([g["pixel_values"] for g, _ in rows]),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["num_images"] = [1] * len(rows)
    batch["num_tiles"] = [len(g["pixel_values"]) for g, _ in rows]
    return batch


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from internvl_tune.config import MPOConfig, RLArgs
    from internvl_tune.losses.rl import group_advantages
    from internvl_tune.model.load import load_model

    workdir = Path(args.workdir)
    groups, rewards, _ = load_groups(args)
    old_logps = torch.load(workdir / "old_logps.pt")
    advantages = group_advantages(rewards, conventions="trl")  # TRL's own rule: eps 1e-4
    rl = RLArgs(num_generations=args.num_generations)
    train = MPOConfig().train
    model, tokenizer = load_model(common.model_dir_for(args.shape, args.models, args.bf16))
    per_step = args.prompts_per_step

    class FixedRollouts(GRPOTrainer):
        """GRPOTrainer whose generation and scoring step returns the step's fixed rollouts."""

        def _generate_and_score_completions(self, inputs):
            step = inputs[0]["group"] // per_step
            first = step * per_step
            return trl_batch(
                args,
                step_groups(args, groups, step),
                old_logps[step],
                advantages[first : first + per_step].reshape(-1),
                tokenizer.pad_token_id,
                self.accelerator.device,
            )

    # A row per group: TRL's sampler repeats each one G times; the prompt text is never rendered.
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": "-"}], "group": i} for i in range(len(groups))]
    )
    clock = common.step_clock()
    settings = common.trl_run_settings(
        args,
        output_dir=str(workdir / "runs" / "trl"),
        batch_size=per_step * args.num_generations,
        learning_rate=train.learning_rate,
        weight_decay=train.weight_decay,
        seed=SEED,
    )
    del settings["max_length"], settings["train_sampling_strategy"]  # DPO / SFT fields; GRPO has its own sampler
    config = GRPOConfig(
        num_generations=args.num_generations,
        importance_sampling_level="sequence",
        loss_type="grpo",  # = seq-mean-token-mean (module docstring)
        epsilon=rl.clip_ratio_low,
        epsilon_high=rl.clip_ratio_high,
        beta=rl.kl_coef,
        scale_rewards=rl.scale_rewards,
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=args.answer_tokens,
        shuffle_dataset=False,
        log_completions=False,
        **settings,
    )

    def fixed_rewards(**kwargs):
        raise AssertionError("not called: the overridden generation step returns the fixed rewards' advantages")

    trainer = FixedRollouts(
        model=model,
        reward_funcs=fixed_rewards,  # TRL requires a reward source
        args=config,
        train_dataset=dataset,
        processing_class=common.tokenizer_only_processor(tokenizer),
        callbacks=[clock],
    )
    trainer.train()
    step_times, timed_s = common.trl_step_times(clock.step_ends, args.warmup_steps, args.timed_steps)
    return {
        "step_times_s": step_times,
        "responses_per_s": per_step * args.num_generations * args.timed_steps / timed_s,
        "losses": [log["loss"] for log in clock.logs],
        "grad_norms": [log.get("grad_norm") for log in clock.logs],
    }


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    if args.child == "old-logps":
        return compute_old_logps(args)
    if args.child == "trl":
        return run_trl(args)
    return run_ours(args, args.child)


# ----------------------------------------------------------------------------------------------------------------------
# The parent: build the workload, run each configuration in a fresh process, report.


def run_all(args: argparse.Namespace, argv: list[str]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    done = common.spawn(__file__, "old-logps", argv, args)  # once, not timed
    if "error" in done:
        return {name: {"error": f"old log-probs failed: {done['error']}"} for name in args.names}
    for name in args.names:
        print(f"== {name}", flush=True)
        results[name] = common.spawn(__file__, name, argv, args)
        if args.device == "cpu" and args.memory_runs and "error" not in results[name]:
            short = [*argv, "--warmup-steps", "1", "--timed-steps", str(MEMORY_RUN_STEPS - 1), "--no-profile"]
            memory = common.spawn(__file__, name, short, args, env_extra=common.FIXED_MALLOC)
            results[name]["held_peak_bytes"] = memory.get("peak_memory_bytes")
        print(f"== {name}: { {k: v for k, v in results[name].items() if k != 'profile'} }", flush=True)
    return results


def grad_norm_check(results: dict[str, dict]) -> tuple[bool, str] | None:
    """(all step-1 gradient norms within GRAD_NORM_TOLERANCE of the first one's, the numbers), or None when fewer
    than two configurations have one."""
    norms = {n: r["grad_norms"][0] for n, r in results.items() if r.get("grad_norms") and r["grad_norms"][0]}
    if len(norms) < 2:
        return None
    base = next(iter(norms.values()))
    ok = all(abs(v - base) <= GRAD_NORM_TOLERANCE * abs(base) for v in norms.values())
    return ok, ", ".join(f"{n} {v:.6g}" for n, v in norms.items())


def report(args: argparse.Namespace, argv: list[str], results: dict[str, dict], workload: dict[str, Any]) -> str:
    """The markdown report: set-up, the table, the correctness check and the target."""
    rollouts = workload["rollouts"]
    flops = rollouts["flops_per_response"]
    on_cpu = args.device == "cpu"
    held = {n: r.get("held_peak_bytes") if on_cpu else r.get("peak_memory_bytes") for n, r in results.items()}
    trl = results.get("trl", {})
    lines = common.header_lines("RL step benchmark", "rl_step.py", argv, args, workload["num_params"])
    g, p = rollouts["num_generations"], args.prompts_per_step
    lines += [
        f"- Rollouts per step: {p} prompt(s) x G = {g} responses; a prompt is {rollouts['tiles']} tiles "
        f"({rollouts['image_tokens']} image tokens) and {rollouts['prompt_tokens']} tokens in all, a response "
        f"{rollouts['response_tokens']} tokens; fixed token ids, rewards (1 for every third response) and old "
        "log-probs (the initial policy's)",
        f"- Run: {args.warmup_steps} warm-up + {args.timed_steps} timed steps per configuration, {args.device}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, gradient checkpointing {'on' if args.grad_checkpoint else 'off'}, "
        f"our attention `{args.attn_implementation}` (TRL: sdpa), AdamW lr 1e-6, weight decay 0.05, clip 1.0",
        "- Loss: ours `rl.loss=gspo`, `loss_agg_mode=seq-mean-token-mean`, clip 0.2 / 0.2, verl conventions, no KL; "
        'TRL `importance_sampling_level="sequence"`, `loss_type="grpo"`, epsilon 0.2 / 0.2, beta 0',
        "",
    ]
    memory_header = "peak held memory | x TRL | peak RSS, default malloc" if on_cpu else "max_memory_allocated | x TRL"
    lines += [
        f"| configuration | responses/s | x TRL | s/step | TFLOP/s |{'' if on_cpu else ' of peak |'} counted "
        f"GFLOP/response | {memory_header} | step-1 loss | step-1 grad norm | step-2 loss |",
        "|---|" + "---:|" * (11 if on_cpu else 10),
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {LABELS[name]} | failed: {r['error']} |")
            continue
        cells = [LABELS[name], f"{r['responses_per_s']:.4f}"]
        cells.append(f"{r['responses_per_s'] / trl['responses_per_s']:.2f}" if "responses_per_s" in trl else "-")
        cells.append(f"{p * g / r['responses_per_s']:.2f}")
        tflops = common.tflops_cells(flops[name] * r["responses_per_s"], args.device)
        cells += tflops[:1] if on_cpu else tflops
        cells.append(f"{flops[name] / 1e9:,.1f}")
        cells.append(mib(held[name]) if held[name] else "-")
        cells.append(f"{held[name] / held['trl']:.2f}" if held[name] and held.get("trl") else "-")
        if on_cpu:
            cells.append(mib(r["peak_memory_bytes"]))
        losses, norms = r["losses"], r["grad_norms"]
        cells.append(f"{losses[0]:.3g}")
        cells.append(f"{norms[0]:.6g}" if norms and norms[0] is not None else "-")
        cells.append(f"{losses[1]:.6g}" if len(losses) > 1 else "-")
        lines.append("| " + " | ".join(cells) + " |")
    others = ", ".join(f"{n} {r['other_cpu_cores']:.2f}" for n, r in results.items() if "other_cpu_cores" in r)
    lines += ["", f"CPU cores other processes kept busy on average during each run (they slow it): {others}.", ""]

    check = grad_norm_check(results)
    if check is None:
        lines.append("- Same step: not checked (fewer than two configurations ran).")
    else:
        ok, numbers = check
        lines.append(
            f"- Same step (step-1 gradient norms within {GRAD_NORM_TOLERANCE:.0%}): **{'yes' if ok else 'NO'}**, "
            f"{numbers}."
        )
    shared = results.get("shared", {})
    target = 4.0 if on_cpu else 3.0
    where = "on CPU" if on_cpu else "on GPU"
    if "responses_per_s" in shared and "responses_per_s" in trl:
        ratio = shared["responses_per_s"] / trl["responses_per_s"]
        lines.append(
            f"- Group-row responses/s >= {target:.0f} x TRL {where}: **{'met' if ratio >= target else 'not met'}**, "
            f"{shared['responses_per_s']:.4f} / {trl['responses_per_s']:.4f} = {ratio:.2f} x."
        )
    else:
        lines.append(
            f"- Group-row responses/s >= {target:.0f} x TRL {where}: not measured (a run failed or was not run)."
        )
    tiles, prompt, n = rollouts["tiles"], rollouts["prompt_tokens"], rollouts["response_tokens"]
    lines += [
        "",
        "## Notes",
        "",
        f"- Work per prompt and step: the group row puts {tiles} tiles through the ViT and {prompt + g * n:,} "
        f"tokens through the LLM; G separate rows and TRL {g * tiles} tiles and {g * (prompt + n):,} tokens. The "
        f"LM head scores the same {g * n:,} response tokens in all three (ours gathers them, TRL's fused head "
        "skips unlabelled positions). Counted FLOPs per response: "
        + ", ".join(f"{n_} {flops[n_] / 1e9:,.1f} GFLOP" for n_ in CONFIGS)
        + ".",
        "- Same rollouts: TRL's generation and scoring step is overridden to return the fixed rollout of the step "
        "(token ids, tiles, advantages by TRL's rule, the shared old log-probs); its loss, backward and optimizer "
        "are its own. The step-1 loss is -mean(A) with ratio 1, i.e. 0 up to rounding; the step-1 gradient norm "
        "is the check that both tools computed the same update.",
        f"- {common.FLOP_NOTE} {common.peak_note(args.device)}",
    ]
    if on_cpu:
        lines.append(
            "- Memory on CPU: *peak held memory* is the VmHWM of a second, 3-step run with glibc's malloc thresholds "
            "fixed (`common.FIXED_MALLOC`); *peak RSS, default malloc* that of the timed run. TRL's process also "
            "imports trl, datasets, pyarrow and pandas."
        )
    lines += common.profile_section(results, LABELS)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        common.child_main(args, lambda: run_child(args), profile=args.profile and args.child in CONFIGS)
        return None
    start = time.perf_counter()
    paths = build_workload(args, Path(args.workdir))
    workload = {"num_params": common.num_parameters(paths["model_dir"]), "rollouts": describe_rollouts(args)}
    print(f"workload: {workload}", flush=True)
    results = run_all(args, argv)
    text = report(args, argv, results, workload)
    text += f"\nWhole benchmark: {time.perf_counter() - start:.0f} s wall time.\n"
    print(text)
    common.write_report(args.results, text)
    return {"results": results, "workload": workload, "report": text}


if __name__ == "__main__":
    main()
