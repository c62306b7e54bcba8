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
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from internvl_tune.data.errors import DataError
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
        row = next((r for r in open_rows if r.tokens + tokens <= max_tokens and r.tiles + tiles <= max_tiles), None)
        if row is None:
            row = _Row()
            open_rows.append(row)
        row.indices.append(index)
        row.tokens += tokens
        row.tiles += tiles
        if row.tokens == max_tokens or row.tiles == max_tiles:
            open_rows.remove(row)
            yield row.indices
        open_rows.sort(key=lambda r: -r.tiles)  # stable
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
        lengths: Sequence[tuple[int, int] | None],
        rows_per_batch: int,
        settings: PackingSettings,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        num_replicas: int = 1,
        where: Callable[[int], str] = str,
    ):
        self.lengths = list(lengths)
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
        self._plans: dict[int, list[list[int]]] = {}  # the last two epochs' plans (the loader and the loop's look-ups)
        self._num_rows: dict[int, int] = {}  # rows per epoch planned so far: step counting without re-planning
        if not any(length is not None for length in self.lengths):
            raise DataError("no sample can be packed: every record was skipped as bad")

    def rows(self, epoch: int) -> list[list[int]]:
        """The packed rows of `epoch`, as dataset indices of that epoch (planned once, then kept)."""
        if epoch not in self._plans:
            if self.shuffle:
                order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
                order = order.tolist()
            else:
                order = range(self.num_samples)
            s = self.settings
            items = ((i, *self.lengths[i]) for i in order if self.lengths[i] is not None)
            plan = pack(
                items,
                max_tokens=s.max_packed_tokens,
                max_tiles=s.num_images_expected,
                max_buffer_size=s.max_buffer_size,
                oversize=s.oversize_sample,
                where=self.where,
            )
            offset = epoch * self.num_samples
            self._plans[epoch] = [[offset + i for i in row] for row in plan]
            self._num_rows[epoch] = len(self._plans[epoch])
            while len(self._plans) > 2:
                del self._plans[min(self._plans)]
        return self._plans[epoch]

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches each rank takes in `epoch` (the last global batch may be partial)."""
        num_rows = self._num_rows[epoch] if epoch in self._num_rows else len(self.rows(epoch))
        return math.ceil(num_rows / (self.rows_per_batch * self.num_replicas))

    def micro_batch(self, epoch: int, batch: int) -> list[list[int]]:
        """This rank's rows of micro-batch `batch` of `epoch` (fewer, or none, in a partial last global batch)."""
        start = (batch * self.num_replicas + self.rank) * self.rows_per_batch
        return self.rows(epoch)[start : start + self.rows_per_batch]

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
            "sample lengths": lengths_digest([None if n is None else list(n) for n in self.lengths]),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def statistics(self, epoch: int = 0) -> dict[str, float]:
        """What packing does to an epoch: rows, samples per row, fill of the token budget, samples alone."""
        rows = self.rows(epoch)
        offset = epoch * self.num_samples
        s = self.settings
        sizes = [[self.lengths[i - offset] for i in row] for row in rows]
        tokens = [sum(t for t, _ in row) for row in sizes]
        oversize = sum(
            1
            for row in sizes
            if sum(t for t, _ in row) > s.max_packed_tokens or sum(n for _, n in row) > s.num_images_expected
        )
        return {
            "num_rows": len(rows),
            "num_samples": sum(len(row) for row in rows),
            "samples_per_row": sum(len(row) for row in rows) / max(1, len(rows)),
            "fill_ratio": sum(min(t, s.max_packed_tokens) for t in tokens) / max(1, len(rows) * s.max_packed_tokens),
            "num_oversize": oversize,
            "num_skipped": sum(1 for length in self.lengths if length is None),
        }


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
