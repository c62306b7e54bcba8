"""A resumable, rank-sharded batch sampler: exact O(1) resume of the data stream."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import torch

from internvl_tune.data.errors import DataError


class ResumableBatchSampler:
    """Yields this rank's micro-batches of dataset indices, epoch after epoch, from any saved position.

    Each epoch is a permutation of `range(num_samples)` drawn from `seed + epoch`; global batches of
    `batch_size * num_replicas` consecutive entries are cut from it (a last partial global batch is dropped so
    every rank takes the same number of steps) and rank r takes the r-th slice of each. Indices are
    `epoch * num_samples + i` so the dataset knows the epoch (see `RecordDataset`).

    Example: 10 samples, batch_size 2, 2 ranks -> 2 global batches of 4 per epoch; rank 0 gets perm[0:2] and
    perm[4:6], rank 1 gets perm[2:4] and perm[6:8]; perm[8:10] is dropped for this epoch.

    The state is `(epoch, batch)`: the next micro-batch to yield. Restoring it costs nothing.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        num_replicas: int = 1,
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.num_replicas = num_replicas
        self.epoch = 0
        self.batch = 0
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{num_samples} samples cannot fill one global batch of {batch_size} x {num_replicas} processes"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.num_replicas)

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches per epoch (the same every epoch; packed samplers vary)."""
        return self.batches_per_epoch

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            permutation = self._permutation(self.epoch)
            global_size = self.batch_size * self.num_replicas
            while self.batch < self.batches_per_epoch:
                start = self.batch * global_size + self.rank * self.batch_size
                batch = [self.epoch * self.num_samples + i for i in permutation[start : start + self.batch_size]]
                self.batch += 1
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def order_inputs(self) -> dict[str, Any]:
        """Everything the micro-batches depend on besides the position: equal inputs, equal batches (the record a
        checkpoint keeps, so that a resume on other data is refused, not silently trained on other rows)."""
        return {
            "batching": "random",
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "num_processes": self.num_replicas,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }


def lengths_digest(lengths) -> str:
    """A short hash of per-sample lengths (any JSON-able values), for `order_inputs`."""
    return hashlib.sha256(json.dumps(list(lengths)).encode()).hexdigest()[:16]


class LengthGroupedBatchSampler(ResumableBatchSampler):
    """`ResumableBatchSampler` whose global batches hold samples of similar length (less padding).

    Each epoch's permutation is cut into mega-batches of `group_size` global batches; a mega-batch is sorted by
    length (longest first) and cut into global batches; then the order of all global batches of the epoch is
    shuffled (seed + epoch), so that neither the lengths nor the data sources drift through the epoch. The samples
    of the last partial global batch are left out of the epoch, as without grouping. Lengths are the token counts of
    the length cache (data/lengths.py); a skipped record (None) counts as 0.
    """

    def __init__(self, lengths, batch_size: int, *, group_size: int = 64, **kwargs):
        super().__init__(len(lengths), batch_size, **kwargs)
        self.lengths = [0 if length is None else length[0] for length in lengths]
        self.group_size = group_size

    def _permutation(self, epoch: int) -> list[int]:
        order = super()._permutation(epoch)
        global_size = self.batch_size * self.num_replicas
        used, left = order[: self.batches_per_epoch * global_size], order[self.batches_per_epoch * global_size :]
        mega = global_size * self.group_size
        blocks = []
        for start in range(0, len(used), mega):
            group = sorted(used[start : start + mega], key=lambda i: -self.lengths[i])
            blocks += [group[b : b + global_size] for b in range(0, len(group), global_size)]
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch + 1_000_003)
            blocks = [blocks[i] for i in torch.randperm(len(blocks), generator=generator).tolist()]
        shuffled = blocks
        return [i for block in shuffled for i in block] + left

    def order_inputs(self) -> dict[str, Any]:
        return {
            **super().order_inputs(),
            "batching": "length-grouped",
            "group_size": self.group_size,
            "sample lengths": lengths_digest(self.lengths),
        }
