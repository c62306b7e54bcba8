"""Packing: several samples (or preference pairs) per row, planned from their lengths, resumable at any micro-batch.

The packer is the original InternVL's buffer algorithm, run on sample lengths (tokens, tiles) in the epoch's sample
order instead of on built samples:

- select: the next sample of the epoch's permutation (a uniform permutation over all datasets, which draws each
  dataset in proportion to its size, as the original's per-dataset choice does);
- search: the first open row, in order of most tiles first, where the sample fits both budgets
  (`max_packed_tokens` tokens and `num_images_expected` tiles);
- pack: add it there, or open a new row;
- maintain: a row that reaches either budget exactly is closed; while more than `max_buffer_size` rows are open, the
  one with the most tiles is closed; at the end of the epoch every open row is closed, in order.

A sample is never cut (so no image span is ever split, the original's bug with dynamic tiles cannot happen), and a
sample over either budget is refused with its file:line (`oversize_sample: error`) or trained in a row of its own
(`alone`). Samples of a row attend only to themselves and their position ids restart (data/collate.py,
model/attention.py).

Worked example, budgets 10 tokens and 4 tiles, buffer 2, samples (tokens, tiles) a=(6,2) b=(5,1) c=(4,2) d=(3,0)::

    a -> open [a]                          rows open: [a 6/2]
    b -> does not fit [a] (11 > 10)        rows open: [a 6/2], [b 5/1]
    c -> fits [a]: 10 tokens, 4 tiles      [a c] is full -> closed;  rows open: [b 5/1]
    d -> fits [b]                          rows open: [b d 8/1]
    end of epoch                           closed: [a c], [b d]

Because the plan is a pure function of (seed, epoch, lengths), the packer's buffer at any point of an epoch is
reproduced exactly from the position alone: a checkpoint stores (epoch, micro-batch), and a resumed run trains on the
rows an uninterrupted run would have trained on without building a single sample to get there. Every rank computes
the same global plan and takes its slice of each global batch of `rows_per_batch x num_replicas` rows, so a run on
2 ranks trains on the same rows per step as a run on 1 rank with accumulation 2. The last global batch of an epoch
may be partial: ranks past its end get fewer rows, or none (an empty micro-batch); no sample is dropped.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from internvl_tune.data.errors import DataError
from internvl_tune.data.lengths import SKIPPED, as_length_array, worker_signals
from internvl_tune.data.sampler import lengths_digest


@dataclass
class _Row:
    indices: list[int] = field(default_factory=list)
    tokens: int = 0
    tiles: int = 0


def fits(tokens: int, tiles: int, *, max_tokens: int, max_tiles: int) -> bool:
    """Whether a sample of `tokens` and `tiles` fits a packed row's budgets (else the packer refuses it or packs it
    alone, and check-data reports it)."""
    return tokens <= max_tokens and tiles <= max_tiles


def over_budget_error(where: str, tokens: int, tiles: int, *, max_tokens: int, max_tiles: int) -> DataError:
    """What a sample that does not `fit` is refused with (`oversize_sample: error`): the packer raises it and
    check-data reports it, word for word."""
    return DataError(
        f"{where}: the sample needs {tokens} tokens and {tiles} tiles, more than a packed row holds "
        f"(max_packed_tokens={max_tokens}, num_images_expected={max_tiles}); raise them, lower "
        "max_dynamic_patch or max_num_frame, or set data.oversize_sample=alone to train such samples in a row of their "
        "own",
        "over packing budget",
    )


def pack(
    items: Iterable[tuple[int, int, int]],
    *,
    max_tokens: int,
    max_tiles: int,
    max_buffer_size: int,
    oversize: str = "error",
    where: Callable[[int], str] = str,
) -> Iterator[list[int]]:
    """Rows of sample ids from `(id, tokens, tiles)` items, in the order the packer closes them (module docstring).

    Raises:
        DataError: with `oversize="error"`, for the first item over a budget, naming it by `where(id)`.
    """
    if oversize not in ("error", "alone"):
        raise ValueError(f"oversize_sample must be 'error' or 'alone', got {oversize!r}")
    open_rows: list[_Row] = []  # most tiles first; rows with equal tiles keep their opening order
    for index, tokens, tiles in items:
        if not fits(tokens, tiles, max_tokens=max_tokens, max_tiles=max_tiles):
            if oversize == "error":
                raise over_budget_error(where(index), tokens, tiles, max_tokens=max_tokens, max_tiles=max_tiles)
            yield [index]
            continue
        # The loop keeps `open_rows` sorted as a stable sort by tiles (most first) after each sample would, by moving
        # only the row that changed: this is the planner's inner loop, run once per sample and epoch.
        room_tokens, room_tiles = max_tokens - tokens, max_tiles - tiles
        for position, row in enumerate(open_rows):  # noqa: B007 (the row found and its place are used after)
            if row.tokens <= room_tokens and row.tiles <= room_tiles:
                break
        else:
            row, position = _Row(), len(open_rows)
            open_rows.append(row)
        row.indices.append(index)
        row.tokens += tokens
        row.tiles += tiles
        if row.tokens == max_tokens or row.tiles == max_tiles:
            del open_rows[position]
            yield row.indices
        elif tiles:
            # More tiles: the row moves before the rows with fewer (a stable sort keeps it after the equal ones).
            target = position
            while target and open_rows[target - 1].tiles < row.tiles:
                target -= 1
            if target != position:
                del open_rows[position]
                open_rows.insert(target, row)
        while len(open_rows) > max_buffer_size:
            yield open_rows.pop(0).indices
    for row in open_rows:
        yield row.indices


@dataclass
class PackingSettings:
    """The packer's budgets (DataArgs fields of the same names)."""

    max_packed_tokens: int
    num_images_expected: int
    max_buffer_size: int
    oversize_sample: str = "error"


class PackedBatchSampler:
    """Yields this rank's micro-batches of packed rows: lists of `(dataset index, row slot)`, epoch after epoch.

    Args:
        lengths: per dataset index, `(tokens, tiles)` of its sample, or None for a record that is skipped (bad).
        rows_per_batch: packed rows per micro-batch per process (`per_device_train_batch_size`).
        settings: the budgets.
        where: names a dataset index in errors (file:line).

    Dataset indices are `epoch * len(lengths) + i`, as `ResumableBatchSampler` yields them, so each sample's
    augmentation is a pure function of (seed, epoch, i). The state is `(epoch, batch)`.
    """

    def __init__(
        self,
        lengths: Sequence[tuple[int, int] | None] | np.ndarray,
        rows_per_batch: int,
        settings: PackingSettings,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        num_replicas: int = 1,
        where: Callable[[int], str] = str,
    ):
        self.lengths = as_length_array(lengths)  # [N, 2] int32, SKIPPED for a skipped record
        self.num_samples = len(self.lengths)
        self.rows_per_batch = rows_per_batch
        self.settings = settings
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.num_replicas = num_replicas
        self.where = where
        self.epoch = 0
        self.batch = 0
        # The last two epochs' plans (the loader and the loop's look-ups), each as (sample ids [S] int64, row starts
        # [R + 1]): 8 bytes per sample instead of a list of lists of ints.
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._num_rows: dict[int, int] = {}  # rows per epoch planned or counted so far: steps without re-planning
        if not (self.lengths[:, 0] != SKIPPED).any():
            raise DataError("no sample can be packed: every record was skipped as bad")

    def rows(self, epoch: int) -> list[list[int]]:
        """The packed rows of `epoch`, as dataset indices of that epoch (planned once, then kept)."""
        ids, starts = self._plan(epoch)
        return [ids[a:b].tolist() for a, b in zip(starts[:-1].tolist(), starts[1:].tolist(), strict=True)]

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._plans:
            rows = plan_epoch(self.lengths, self.settings, self.seed, self.shuffle, epoch, where=self.where)
            ids = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=sum(map(len, rows)))
            starts = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum([len(row) for row in rows], out=starts[1:])
            self._plans[epoch] = (ids + epoch * self.num_samples, starts)
            self._num_rows[epoch] = len(rows)
            while len(self._plans) > 2:
                del self._plans[min(self._plans)]
        return self._plans[epoch]

    def set_num_rows(self, num_rows: dict[int, int]) -> None:
        """Rows per epoch counted elsewhere (`count_rows`, in parallel), so the step count needs no plan here; each
        epoch is still planned in full when it starts."""
        self._num_rows.update(num_rows)

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches each rank takes in `epoch` (the last global batch may be partial)."""
        num_rows = self._num_rows[epoch] if epoch in self._num_rows else len(self._plan(epoch)[1]) - 1
        return math.ceil(num_rows / (self.rows_per_batch * self.num_replicas))

    def micro_batch(self, epoch: int, batch: int) -> list[list[int]]:
        """This rank's rows of micro-batch `batch` of `epoch` (fewer, or none, in a partial last global batch)."""
        ids, starts = self._plan(epoch)
        first = (batch * self.num_replicas + self.rank) * self.rows_per_batch
        bounds = starts[first : first + self.rows_per_batch + 1].tolist()
        return [ids[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=False)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            while self.batch < self.batches_in_epoch(self.epoch):
                rows = self.micro_batch(self.epoch, self.batch)
                self.batch += 1
                yield [(index, slot) for slot, row in enumerate(rows) for index in row]
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def order_inputs(self) -> dict[str, Any]:
        """Everything the rows depend on besides the position (see `ResumableBatchSampler.order_inputs`)."""
        s = self.settings
        return {
            "batching": "packed",
            "num_samples": self.num_samples,
            "batch_size": self.rows_per_batch,
            "num_processes": self.num_replicas,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "max_packed_tokens": s.max_packed_tokens,
            "num_images_expected": s.num_images_expected,
            "max_buffer_size": s.max_buffer_size,
            "oversize_sample": s.oversize_sample,
            "sample lengths": lengths_digest(self.lengths),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def statistics(self, epoch: int = 0) -> dict[str, float]:
        """What packing does to an epoch: rows, samples per row, fill of the token budget, samples alone."""
        ids, starts = self._plan(epoch)
        s = self.settings
        num_rows = len(starts) - 1
        sizes = self.lengths[ids - epoch * self.num_samples].astype(np.int64)
        tokens, tiles = np.add.reduceat(sizes, starts[:-1], axis=0).T if num_rows else np.zeros((2, 0), np.int64)
        return {
            "num_rows": num_rows,
            "num_samples": len(ids),
            "samples_per_row": len(ids) / max(1, num_rows),
            "fill_ratio": float(np.minimum(tokens, s.max_packed_tokens).sum()) / max(1, num_rows * s.max_packed_tokens),
            "num_oversize": int(((tokens > s.max_packed_tokens) | (tiles > s.num_images_expected)).sum()),
            "num_skipped": int((self.lengths[:, 0] == SKIPPED).sum()),
        }


def plan_epoch(
    lengths: np.ndarray, settings: PackingSettings, seed: int, shuffle: bool, epoch: int, *, where: Callable = str
) -> list[list[int]]:
    """The rows of `epoch` (sample ids of `lengths`, skipped ones left out): a pure function of its arguments, so any
    process plans the same rows (`count_rows` plans epochs in other processes)."""
    num_samples = len(lengths)
    if shuffle:
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
    else:
        order = np.arange(num_samples)
    order = order[lengths[order, 0] != SKIPPED]
    items = zip(order.tolist(), lengths[order, 0].tolist(), lengths[order, 1].tolist(), strict=True)
    return list(
        pack(
            items,
            max_tokens=settings.max_packed_tokens,
            max_tiles=settings.num_images_expected,
            max_buffer_size=settings.max_buffer_size,
            oversize=settings.oversize_sample,
            where=where,
        )
    )


def count_rows(
    lengths: np.ndarray, settings: PackingSettings, seed: int, shuffle: bool, epochs: list[int], workers: int
) -> dict[int, int]:
    """Rows of each epoch in `epochs`, planned in a pool of `workers` processes (in this one for 0 or 1): the step
    count of a run of several epochs without planning them one after the other at start-up."""
    if workers <= 1 or len(epochs) <= 1:
        return {e: len(plan_epoch(lengths, settings, seed, shuffle, e)) for e in epochs}
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    context = (lengths, settings, seed, shuffle)
    with multiprocessing.get_context(method).Pool(
        min(workers, len(epochs)), initializer=_init_planner, initargs=(context,)
    ) as pool:
        return dict(zip(epochs, pool.map(_count_in_worker, epochs), strict=True))


_planner_context = None


def _init_planner(context) -> None:
    global _planner_context
    worker_signals()
    _planner_context = context


def _count_in_worker(epoch: int) -> int:
    return len(plan_epoch(*_planner_context, epoch))


class PackedDataset(torch.utils.data.Dataset):
    """Wraps a sample dataset for `PackedBatchSampler`: item `(index, slot)` is sample `index` tagged with its row
    slot in the micro-batch (`"row"`), which the packed collators group by."""

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, slot = key
        return {**self.dataset[index], "row": slot}
