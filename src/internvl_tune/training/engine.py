"""The distributed engine around a recipe's loop (accelerate): set-up, resume, data stream, saves, teardown.

Recipes keep the loop (forward, loss, backward, step, log, save) in view; what both recipes do identically
around it lives here, so `sft.py` and `mpo.py` differ only in their method.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader, Dataset

from internvl_tune.atomic import atomic_dir, remove_stale_temporaries
from internvl_tune.checkpoints.metadata import checkpoint_settings, metadata_for
from internvl_tune.checkpoints.read import resolve_dtype
from internvl_tune.config import ConfigError, DataArgs, ModelArgs, TrainArgs, to_dict
from internvl_tune.data.errors import DataError
from internvl_tune.data.lengths import dataset_lengths, tokenizer_fingerprint
from internvl_tune.data.packing import PackedBatchSampler, PackedDataset, PackingSettings
from internvl_tune.data.sampler import LengthGroupedBatchSampler, ResumableBatchSampler
from internvl_tune.model.forward import base_model
from internvl_tune.model.save import save_hf_checkpoint
from internvl_tune.training.checkpoint import (
    CHECKPOINT_PATTERN,
    STATE_FILE,
    TrainState,
    checkpoint_problem,
    keep_trainable_weights,
    list_checkpoints,
    prune_checkpoints,
    read_train_state,
    resolve_resume,
    save_adapter,
)
from internvl_tune.training.failure import watch_peers
from internvl_tune.training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


# What a run writes into output_dir (beside checkpoint-N/): a folder holding any of them holds a run. Other files
# (a precomputed reference cache) are not the run's: they are neither a reason to refuse nor deleted on overwrite.
RUN_FILES = (
    "metrics.jsonl",
    "summary.json",
    "config.resolved.json",
    "final",
    "final_adapter",
    "tensorboard",
    "wandb",
)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT / SIGTERM; the message says what was saved (the CLI prints it as one line)."""


class StopRequest:
    """The first SIGINT / SIGTERM asks the loop to save a checkpoint and stop at the next step boundary (a step
    cut in half cannot be resumed); a second one stops at once, with a plain KeyboardInterrupt.

    Installed before the data loader starts, so its forked workers inherit it and ignore the signals: a Ctrl-C
    reaches the whole process group, and workers ended by it would fail the loop before its checkpoint.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:  # a data loader worker: the loop ends it
            return
        if self.signal_name is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s: stopping after this step with a checkpoint (again: stop at once)", self.signal_name)

    def requested(self, accelerator: Accelerator) -> bool:
        """Whether any rank was signalled; every rank calls it at every step boundary, so all stop at the same one."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        flag = torch.tensor(int(self.signal_name is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item())


@contextlib.contextmanager
def run_session(t: TrainArgs) -> Iterator[Accelerator]:
    """The accelerator of one run; afterwards, whether the run finished or raised, accelerate's global state is gone
    (see `finish`), so the next run in the process may choose another precision."""
    accelerator = make_accelerator(t)
    try:
        yield accelerator
    finally:
        finish(accelerator)


def make_accelerator(t: TrainArgs) -> Accelerator:
    # cpu=True on machines without an accelerator makes torchrun / accelerate launch give DDP over gloo.
    accelerator = Accelerator(
        mixed_precision="bf16" if t.bf16 else "no",
        cpu=not torch.accelerator.is_available(),
        log_with=None if t.report_to == "none" else t.report_to,  # its tracker starts in `start_tracker`
        project_dir=t.output_dir,
    )
    watch_peers(accelerator.process_index, accelerator.num_processes)  # a rank's error ends every rank
    return accelerator


def prepare_output_dir(accelerator: Accelerator, t: TrainArgs) -> tuple[Path, Path | None]:
    """Check and prepare `output_dir` before anything is loaded; returns it and the checkpoint to resume from.

    A folder that holds another run is refused unless the run resumes (`resume_from_checkpoint`) or replaces it
    (`overwrite_output_dir`, which deletes the run's files): reusing it silently would append to its metrics, replace
    its final model and leave its checkpoints for a later `auto` resume. A run that stopped before its first step
    (no step logged, no checkpoint, no final model: only its resolved config) is no run: its folder is reused.
    Leftovers of saves that were killed are removed.
    """
    output_dir = Path(t.output_dir)
    found = sorted(p.name for p in output_dir.glob("*") if p.name in RUN_FILES or CHECKPOINT_PATTERN.match(p.name))
    started, has_checkpoint = bool(found) and _run_started(output_dir), bool(list_checkpoints(output_dir))
    if found and not started:
        logger.info("%s holds a run that stopped before its first step (%s): reusing it", output_dir, ", ".join(found))
    elif found and not (t.resume_from_checkpoint or t.overwrite_output_dir):
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        resume = "resume it with train.resume_from_checkpoint=auto, " if has_checkpoint else ""
        raise ConfigError(
            f"{output_dir} holds another run ({listed}): {resume}replace it with train.overwrite_output_dir=true, or "
            "pick another train.output_dir"
        )
    elif found and t.resume_from_checkpoint == "auto" and not has_checkpoint:
        raise ConfigError(
            f"{output_dir} holds another run with no checkpoint to resume (a resume would train it again from step "
            "0): replace it with train.overwrite_output_dir=true, or pick another train.output_dir"
        )
    resume_dir = resolve_resume(t.resume_from_checkpoint, output_dir)
    accelerator.wait_for_everyone()  # every rank has looked before the main process deletes anything
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_temporaries(output_dir):
            logger.info("removed %s, left by an interrupted save", path)
        if found and (t.overwrite_output_dir or not started):
            if t.overwrite_output_dir:
                logger.warning("overwrite_output_dir: deleting %s in %s", ", ".join(found), output_dir)
            for name in found:
                path = output_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    accelerator.wait_for_everyone()
    return output_dir, resume_dir


def _run_started(output_dir: Path) -> bool:
    """Whether `output_dir` holds a run that did something: a logged step, a checkpoint or a final model."""
    metrics = output_dir / "metrics.jsonl"
    logged = metrics.is_file() and any(line.strip() for line in metrics.read_text().splitlines())
    finished = any((output_dir / name).exists() for name in ("final", "final_adapter", "summary.json"))
    return logged or finished or bool(list_checkpoints(output_dir))


def make_batching(dataset, measure, settings, tokenizer, d: DataArgs, t: TrainArgs, accelerator: Accelerator):
    """(sampler, dataset, bad records) for the run: plain random batches; length-grouped batches (`group_by_length`);
    or packed rows (`packing`, with the dataset wrapped so each sample knows its row).

    An epoch is one pass over the usable records. The last two, and every run that skips bad records
    (`on_bad_sample=skip`), plan with the length cache (data/lengths.py), measured by the main process first, then
    read by the others: a bad record is found there, left out of every epoch (the step count follows from the good
    ones), and returned as `(file:line, message)` once, which `next_step` counts once per epoch.
    """
    common = dict(
        seed=t.seed, shuffle=t.shuffle, rank=accelerator.process_index, num_replicas=accelerator.num_processes
    )
    skip_bad = d.on_bad_sample == "skip"
    if not d.packing and not d.group_by_length and not skip_bad:
        return ResumableBatchSampler(len(dataset), t.per_device_train_batch_size, **common), dataset, []
    fingerprint = f"{type(measure.__self__).__name__}|{settings!r}|{tokenizer_fingerprint(tokenizer)}"
    problems: dict[int, str] = {}
    with accelerator.main_process_first():
        lengths = dataset_lengths(
            dataset,
            measure,
            settings_fingerprint=fingerprint,
            skip_bad=skip_bad,
            progress=accelerator.is_main_process,
            problems=problems,
        )
    bad = list({dataset.where(i): message for i, message in problems.items()}.items())  # a repeated line: once
    if len(problems) == len(dataset):
        where, message = bad[0]
        raise DataError(
            f"no record to train on: all {len(bad)} were skipped as bad; the first: "
            + (message if message.startswith(where) else f"{where}: {message}")
        )
    if bad:
        logger.warning(
            "%d records skipped as bad before training (each epoch trains the other %d); first: %s",
            len(bad),
            len(dataset) - len(problems),
            ", ".join(where for where, _ in bad[:3]),
        )
    if d.group_by_length:
        return LengthGroupedBatchSampler(lengths, t.per_device_train_batch_size, **common), dataset, bad
    if not d.packing:
        usable = [i for i, length in enumerate(lengths) if length is not None]
        return ResumableBatchSampler(len(dataset), t.per_device_train_batch_size, usable=usable, **common), dataset, bad
    packing = PackingSettings(d.max_packed_tokens, d.num_images_expected, d.max_buffer_size, d.oversize_sample)
    sampler = PackedBatchSampler(lengths, t.per_device_train_batch_size, packing, where=dataset.where, **common)
    stats = sampler.statistics(0)
    logger.info(
        "packing: %d samples into %d rows (%.1f per row, %.0f%% of the token budget filled, %d alone over budget)",
        stats["num_samples"],
        stats["num_rows"],
        stats["samples_per_row"],
        100 * stats["fill_ratio"],
        stats["num_oversize"],
    )
    return sampler, PackedDataset(dataset), bad


def sampler_position(sampler, micro_batches: int) -> tuple[int, int]:
    """(epoch, micro-batch within it) after `micro_batches` consumed; epochs may differ in length (packing)."""
    epoch = 0
    while micro_batches >= (in_epoch := sampler.batches_in_epoch(epoch)):
        micro_batches -= in_epoch
        epoch += 1
    return epoch, micro_batches


def epoch_progress(sampler, micro_batches: int) -> float:
    """Epochs done as a fraction, e.g. 1.25 (the `epoch` metric)."""
    epoch, batch = sampler_position(sampler, micro_batches)
    return epoch + batch / sampler.batches_in_epoch(epoch)


def schedule_lengths(sampler, t: TrainArgs) -> tuple[int, int]:
    """(total optimizer steps, warmup steps). An epoch's last step takes its remaining micro-batches (see
    `micro_batches_in_step`): 3 micro-batches with accumulation 2 are 2 steps. With packing, epochs differ in length:
    each is counted from its own plan."""
    if t.max_steps > 0:
        total_steps = t.max_steps
    else:
        steps = [
            math.ceil(sampler.batches_in_epoch(e) / t.gradient_accumulation_steps)
            for e in range(math.ceil(t.num_train_epochs))
        ]
        whole = int(t.num_train_epochs)
        total_steps = sum(steps[:whole]) + (
            math.ceil((t.num_train_epochs - whole) * steps[whole]) if whole < len(steps) else 0
        )
    return total_steps, math.ceil(t.warmup_ratio * total_steps)


def micro_batches_in_step(state: TrainState, sampler, t: TrainArgs) -> int:
    """`gradient_accumulation_steps`, or what is left of the epoch: its remainder is a last, smaller step rather
    than dropped (the step's loss is normalised by its own token or pair count, so a smaller step is no different)."""
    epoch, batch = sampler_position(sampler, state.micro_batches)
    return min(t.gradient_accumulation_steps, sampler.batches_in_epoch(epoch) - batch)


def next_step(
    micro_batches: Iterator[dict[str, Any]],
    sampler,
    state: TrainState,
    t: TrainArgs,
    accelerator: Accelerator,
    bad_records: list[tuple[str, str]],
) -> list[dict[str, Any]]:
    """The next optimizer step's micro-batches, with the data position and the counts of skipped and cut samples
    moved on.

    A record found bad before training (`bad_records`, from `make_batching`) is counted once in every epoch the run
    enters; one found bad while its sample is built is counted where its micro-batch is read, on every rank (an
    all-reduce of the count, and a gather of the messages only when some rank has any), so the summary lists it
    whichever rank read it.
    """
    _, batch_in_epoch = sampler_position(sampler, state.micro_batches)
    if batch_in_epoch == 0:
        state.skipped += bad_records
    batches = [next(micro_batches) for _ in range(micro_batches_in_step(state, sampler, t))]
    state.micro_batches += len(batches)
    skipped = [entry for batch in batches for entry in batch["skipped"]]
    num_truncated, num_skipped = step_totals(
        accelerator, [sum(b.get("num_truncated", 0) for b in batches), len(skipped)]
    )
    state.num_truncated += num_truncated
    if num_skipped and accelerator.num_processes > 1:  # the same on every rank: all join the gather
        everyone: list = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(everyone, skipped)
        skipped = [entry for rank_skipped in everyone for entry in rank_skipped]
    state.skipped += skipped
    return batches


def idle_loss(forward, accelerator: Accelerator, pad_token_id: int, dummy_tile: torch.Tensor) -> torch.Tensor:
    """A zero loss for a micro-batch with nothing to train (its samples skipped as bad, or a rank past the end of a
    packed epoch's last global batch), computed by a real forward on one padding token and one dummy tile: DDP's
    forward broadcasts buffers and its backward all-reduces every gradient, so every rank must run both."""
    device = accelerator.device
    token_logps = forward(
        input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long, device=device),
        attention_mask=torch.ones((1, 1), dtype=torch.long, device=device),
        position_ids=torch.zeros((1, 1), dtype=torch.long, device=device),
        pixel_values=dummy_tile.unsqueeze(0).to(device),
        image_flags=torch.zeros(1, dtype=torch.bool),
        logp_index=torch.zeros(1, dtype=torch.long, device=device),
        logp_targets=torch.full((1,), pad_token_id, dtype=torch.long, device=device),
    )
    return token_logps.sum() * 0.0


def step_totals(accelerator: Accelerator, counts: list[int | float]) -> list[int | float]:
    """Counts known on this rank's CPU (samples, tokens, loss-weight sums) summed over all ranks, each keeping its
    type. One process reads nothing back from the device; several make one small all-reduce per step, the one host
    sync a step needs (its denominators)."""
    if accelerator.num_processes == 1:
        return list(counts)
    summed = accelerator.reduce(torch.tensor(counts, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return [type(c)(v) if isinstance(c, float) else round(v) for c, v in zip(counts, summed, strict=True)]


def is_logging_step(step: int, t: TrainArgs, total_steps: int) -> bool:
    """Whether optimizer step `step` (1-based) logs: metrics are read from the device only on these steps."""
    return step % t.logging_steps == 0 or step == total_steps


def read_step_metrics(accelerator: Accelerator, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's metric sums (device tensors accumulated over its micro-batches), summed over ranks and read in
    one transfer: the only time a logging step waits for the device."""
    names = set(sums)
    if accelerator.num_processes > 1:
        # A rank that trained nothing this step (skipped samples, past the end of a packed epoch) has no sums: every
        # rank must reduce the same names, a missing one counting 0.
        everyone: list = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(everyone, sorted(names))
        names = set().union(*everyone)
    names = sorted(names)
    if not names:
        return {}
    zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    stacked = torch.stack([sums[n].detach().to(torch.float64).reshape(()) if n in sums else zero for n in names])
    return dict(zip(names, accelerator.reduce(stacked, "sum").tolist(), strict=True))


def throughput_metrics(
    accelerator: Accelerator, batches: list[dict[str, Any]], elapsed: float, *, num_samples: int, num_loss_tokens: int
) -> dict[str, float]:
    """The metrics both recipes log under the same names (docs/metrics.md): counts over the step's micro-batches on
    all ranks (an MPO sample is a pair) and rates over the step's wall time."""
    real = [b for b in batches if "input_ids" in b]
    num_image_tokens, num_text_tokens, num_pad_tokens, num_positions = step_totals(
        accelerator,
        [
            sum(b["num_image_tokens"] for b in real),
            sum(b["num_text_tokens"] for b in real),
            sum(b["num_pad_tokens"] for b in real),
            sum(b["input_ids"].numel() for b in real),
        ],
    )
    return {
        "num_samples": num_samples,
        "num_loss_tokens": num_loss_tokens,
        "num_image_tokens": num_image_tokens,
        "num_text_tokens": num_text_tokens,
        "padding_share": num_pad_tokens / max(1, num_positions),
        "samples_per_s": num_samples / elapsed,
        "loss_tokens_per_s": num_loss_tokens / elapsed,
        "tokens_per_s": (num_image_tokens + num_text_tokens) / elapsed,
        "vision_tokens_per_s": num_image_tokens / elapsed,
        "text_tokens_per_s": num_text_tokens / elapsed,
        "step_time_s": elapsed,
    }


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
    accelerator.register_for_checkpointing(scheduler, state, *checkpointed)
    if uses_lora:
        # LoRA checkpoints hold the trained weights only; the frozen base comes from model_name_or_path on resume.
        accelerator.register_save_state_pre_hook(keep_trainable_weights)
    if resume_dir is not None:
        saved = read_train_state(resume_dir).get("settings")  # None: a checkpoint of an older version
        if saved is not None and (changed := _changes(saved["trained"], settings["trained"])):
            raise ConfigError(
                f"{resume_dir} trained other parameters ({changed}); a resume continues the same parameters: "
                "restore the setting, or start a new run from the checkpoint's weights"
            )
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        accelerator.load_state(str(resume_dir), strict=not uses_lora)
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
    its own generator, so creating it does not draw from the global RNG that a resume restored. A position only
    means the same rows on the same data and batching: a resume where they changed is refused (`check_data_order`).
    """
    check_data_order(state, sampler.order_inputs(), t)
    epoch, batch_in_epoch = sampler_position(sampler, state.micro_batches)
    sampler.load_state_dict({"epoch": epoch, "batch": batch_in_epoch})
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(t.seed),
    )
    return iter(loader)


def check_data_order(state: TrainState, order: dict[str, Any], t: TrainArgs) -> None:
    """Refuse to resume where the data order differs from the checkpoint's: the rows after the resume would not be
    the rows of the interrupted run (other samples, other lengths, other batch sizes or process counts).
    `train.resume_data_check=false` resumes anyway, with the new order, from the same count of micro-batches."""
    saved, state.data_order = state.data_order, order
    if saved is None or saved == order:
        return
    changes = ", ".join(
        f"{key} {saved.get(key)} -> {order.get(key)}" if key != "sample lengths" else "sample lengths changed"
        for key in sorted(set(saved) | set(order), key=lambda k: (k == "sample lengths", k))
        if saved.get(key) != order.get(key)
    )
    if not t.resume_data_check:
        logger.warning("resuming at step %d with another data order (%s)", state.step, changes)
        return
    raise ConfigError(
        f"step {state.step} was trained in another data order ({changes}); resuming here would train other rows "
        "than the interrupted run. Restore the data and settings, or set train.resume_data_check=false"
    )


def save_step_checkpoint(accelerator: Accelerator, state: TrainState, t: TrainArgs) -> Path:
    """`output_dir/checkpoint-N`, written by every rank into the main process's temporary folder, which the main
    process renames once all parts and, last, `train_state.json` are written: a crash leaves no checkpoint-N."""
    folder = Path(t.output_dir) / f"checkpoint-{state.step}"
    with atomic_dir(folder) if accelerator.is_main_process else contextlib.nullcontext() as tmp:
        (tmp,) = broadcast_object_list([tmp])  # its name holds the main process's pid
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state.state_dict()))
    if accelerator.is_main_process:
        prune_checkpoints(t.output_dir, t.save_total_limit)
    return folder


def save_and_stop(accelerator: Accelerator, state: TrainState, t: TrainArgs) -> None:
    """Answer a stop request at a step boundary: save the step's checkpoint (unless it is already there) and raise
    `TrainingInterrupted` with the line to print."""
    if state.step == 0:
        raise TrainingInterrupted("interrupted before the first step: nothing to save")
    folder = Path(t.output_dir) / f"checkpoint-{state.step}"
    if checkpoint_problem(folder) is not None:
        folder = save_step_checkpoint(accelerator, state, t)
    raise TrainingInterrupted(
        f"interrupted at step {state.step}: saved {folder}; resume with train.resume_from_checkpoint=auto"
    )


def save_final(
    accelerator: Accelerator,
    forward: nn.Module,
    tokenizer,
    output_dir: Path,
    metadata: dict[str, Any],
    *,
    uses_lora: bool,
    dtype: torch.dtype | None = None,
) -> Path:
    """`output_dir/final` (full model, LoRA merged, weights in `dtype`) and, for LoRA, `final_adapter`; from the
    gathered state."""
    accelerator.wait_for_everyone()
    final_dir = output_dir / "final"
    # Gathered on every rank (ZeRO-3 / FSDP shards become whole tensors); written by the main process.
    final_state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(forward).items()}
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(forward).model
        if uses_lora:
            save_adapter(trained, tokenizer, output_dir / "final_adapter", metadata, final_state)
        save_hf_checkpoint(trained, tokenizer, final_dir, metadata, state_dict=final_state, dtype=dtype)
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
    """Save the final model with its metadata, write `summary.json`, report skipped samples."""
    d, output_dir = config.data, Path(config.train.output_dir)
    model = accelerator.unwrap_model(forward).model
    # The family of the starting checkpoint (InternLM2 models train as Llama) travels on for `convert --to original`.
    family = checkpoint_settings(config.model.model_name_or_path).get("llm_family")
    metadata = metadata_for(
        base_model(model).config, {**asdict(settings), "llm_family": family}, config=to_dict(config)
    )
    dtype = resolve_dtype(config.train.save_dtype, config.model.model_name_or_path)
    final_dir = save_final(accelerator, forward, tokenizer, output_dir, metadata, uses_lora=uses_lora, dtype=dtype)
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
    return summary


def finish(accelerator: Accelerator) -> None:
    accelerator.end_training()
    # Forget this run's precision so a later run in the same process (tests, the demo, notebooks) may choose
    # another; the process group (PartialState) is kept.
    AcceleratorState._reset_state()
