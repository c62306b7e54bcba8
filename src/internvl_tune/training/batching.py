"""The data side of a run: batching (random, length-grouped, packed), the step plan over epochs, this rank's stream of
micro-batches from a saved position, and the check that a resume reads the same rows."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from internvl_tune.config import ConfigError, DataArgs, TrainArgs
from internvl_tune.data.errors import DataError
from internvl_tune.data.lengths import SKIPPED, dataset_lengths, measure_workers, tokenizer_fingerprint
from internvl_tune.data.packing import PackedBatchSampler, PackedDataset, PackingSettings, count_rows
from internvl_tune.data.sampler import LengthGroupedBatchSampler, ResumableBatchSampler
from internvl_tune.training.checkpoint import (
    TrainState,
)
from internvl_tune.training.metrics import step_totals

logger = logging.getLogger(__name__)


def make_batching(dataset, measure, settings, tokenizer, d: DataArgs, t: TrainArgs, accelerator: Accelerator):
    """(sampler, dataset, bad records) for the run: plain random batches; length-grouped batches (`group_by_length`);
    or packed rows (`packing`, with the dataset wrapped so each sample knows its row).

    An epoch is one pass over the usable records. The last two, and every run that skips bad records
    (`on_bad_sample=skip`), plan with the length cache (data/lengths.py), measured by every rank together (each its
    share of the records, in `measure_workers` processes), gathered, and written by the main process: a bad record is
    found there, left out of every epoch (the step count follows from the good ones), and returned as
    `(file:line, message)` once, which `next_step` counts once per epoch. A packed run of several epochs counts the
    rows of epochs after the first in parallel too (ranks and workers), to know its step count; each epoch is
    planned in full when it starts.
    """
    common = dict(
        seed=t.seed, shuffle=t.shuffle, rank=accelerator.process_index, num_replicas=accelerator.num_processes
    )
    skip_bad = d.on_bad_sample == "skip"
    if not d.packing and not d.group_by_length and not skip_bad:
        return ResumableBatchSampler(len(dataset), t.per_device_train_batch_size, **common), dataset, []
    fingerprint = f"{type(measure.__self__).__name__}|{settings!r}|{tokenizer_fingerprint(tokenizer)}"
    workers = measure_workers(d.measure_workers)
    problems: dict[int, str] = {}
    lengths = dataset_lengths(
        dataset,
        measure,
        settings_fingerprint=fingerprint,
        skip_bad=skip_bad,
        progress=accelerator.is_main_process,
        problems=problems,
        workers=workers,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        gather=lambda value: gather_objects(value, accelerator),
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
        usable = np.flatnonzero(lengths[:, 0] != SKIPPED)
        return ResumableBatchSampler(len(dataset), t.per_device_train_batch_size, usable=usable, **common), dataset, bad
    packing = PackingSettings(d.max_packed_tokens, d.num_images_expected, d.max_buffer_size, d.oversize_sample)
    sampler = PackedBatchSampler(lengths, t.per_device_train_batch_size, packing, where=dataset.where, **common)
    stats = sampler.statistics(0)  # epoch 0 planned here: a sample over budget stops the run before any other work
    logger.info(
        "packing: %d samples into %d rows (%.1f per row, %.0f%% of the token budget filled, %d alone over budget)",
        stats["num_samples"],
        stats["num_rows"],
        stats["samples_per_row"],
        100 * stats["fill_ratio"],
        stats["num_oversize"],
    )
    if t.max_steps <= 0 and t.num_train_epochs > 1:
        rank, world = accelerator.process_index, accelerator.num_processes
        later = list(range(1, math.ceil(t.num_train_epochs)))
        mine = count_rows(lengths, packing, t.seed, t.shuffle, later[rank::world], workers)
        sampler.set_num_rows({e: n for part in gather_objects(mine, accelerator) for e, n in part.items()})
    return sampler, PackedDataset(dataset), bad


def gather_objects(value: Any, accelerator: Accelerator) -> list[Any]:
    """Every rank's `value`, in rank order (every rank calls this together)."""
    if accelerator.num_processes == 1:
        return [value]
    everyone: list = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(everyone, value)
    return everyone


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
