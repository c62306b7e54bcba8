"""A resumable, rank-sharded batch sampler: exact O(1) resume of the data stream."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from internvl_tune.data.errors import DataError
from internvl_tune.data.lengths import SKIPPED, as_length_array


class ResumableBatchSampler:
    """Yields this rank's micro-batches of dataset indices, epoch after epoch, from any saved position.

    An epoch is one pass over the usable samples (`usable`: every index but the records skipped as bad; all of
    `range(num_samples)` by default), in a permutation drawn from `seed + epoch`. Global batches of
    `batch_size * num_replicas` consecutive entries are cut from it and rank r takes the r-th slice of each. The last
    global batch may be partial: ranks past its end get fewer samples, or none (an empty micro-batch, which the
    recipes answer with a zero loss so that every rank steps together); no sample is dropped. Indices are
    `epoch * num_samples + i` so the dataset knows the epoch (see `RecordDataset`).

    Example: 10 samples, batch_size 2, 2 ranks -> 3 global batches per epoch, of 4, 4 and 2; rank 0 gets perm[0:2],
    perm[4:6], perm[8:10]; rank 1 gets perm[2:4], perm[6:8] and an empty last micro-batch.

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
        usable: Sequence[int] | None = None,
    ):
        self.num_samples = num_samples
        # An int64 array, not a list: 8 bytes per sample, and an epoch's order is sliced, never turned into objects.
        self.usable = np.arange(num_samples, dtype=np.int64) if usable is None else np.asarray(usable, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.num_replicas = num_replicas
        self.epoch = 0
        self.batch = 0
        if not len(self.usable):
            raise DataError(f"no sample to train on: all {num_samples} records were skipped as bad")

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.usable) / (self.batch_size * self.num_replicas))

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches per epoch (the same every epoch; packed samplers vary)."""
        return self.batches_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        """The epoch's order of the usable sample indices."""
        if not self.shuffle:
            return self.usable
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return self.usable[torch.randperm(len(self.usable), generator=generator).numpy()]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            permutation = self._permutation(self.epoch)
            global_size = self.batch_size * self.num_replicas
            while self.batch < self.batches_per_epoch:
                start = self.batch * global_size + self.rank * self.batch_size
                batch = (permutation[start : start + self.batch_size] + self.epoch * self.num_samples).tolist()
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
            "num_usable": len(self.usable),
            "batch_size": self.batch_size,
            "num_processes": self.num_replicas,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }


def lengths_digest(lengths: np.ndarray) -> str:
    """A short hash of per-sample lengths (an integer array), for `order_inputs`. (Before the counts were arrays it
    hashed their JSON: a checkpoint of then reads as "sample lengths changed" and resumes with
    `train.resume_data_check=false`.)"""
    values = np.ascontiguousarray(lengths, dtype=np.int64)
    return hashlib.sha256(json.dumps(values.shape).encode() + values.tobytes()).hexdigest()[:16]


class LengthGroupedBatchSampler(ResumableBatchSampler):
    """`ResumableBatchSampler` whose global batches hold samples of similar length (less padding).

    Each epoch's permutation is cut into mega-batches of `group_size` global batches; a mega-batch is sorted by
    length (longest first) and cut into global batches; then the order of the epoch's full global batches is
    shuffled (seed + epoch), so that neither the lengths nor the data sources drift through the epoch, and a partial
    one (the end of the last mega-batch) comes last, as without grouping. Lengths are the token counts of the length
    cache (data/lengths.py); a record skipped as bad (None) is not in any epoch.
    """

    def __init__(self, lengths, batch_size: int, *, group_size: int = 64, **kwargs):
        counts = as_length_array(lengths)
        usable = np.flatnonzero(counts[:, 0] != SKIPPED)
        super().__init__(len(counts), batch_size, usable=usable, **kwargs)
        self.lengths = np.where(counts[:, 0] == SKIPPED, 0, counts[:, 0])
        self.group_size = group_size

    def _permutation(self, epoch: int) -> np.ndarray:
        """Vectorised: one stable sort by (mega-batch, longest first) is each mega-batch sorted on its own."""
        order = super()._permutation(epoch)
        global_size = self.batch_size * self.num_replicas
        mega = global_size * self.group_size
        order = order[np.lexsort((-self.lengths[order], np.arange(len(order)) // mega))]
        num_full = len(order) // global_size  # a mega-batch is whole global batches: only the last one may be partial
        blocks, partial = (
            order[: num_full * global_size].reshape(num_full, global_size),
            order[num_full * global_size :],
        )
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch + 1_000_003)
            blocks = blocks[torch.randperm(num_full, generator=generator).numpy()]
        return np.concatenate([blocks.reshape(-1), partial])

    def order_inputs(self) -> dict[str, Any]:
        return {
            **super().order_inputs(),
            "batching": "length-grouped",
            "group_size": self.group_size,
            "sample lengths": lengths_digest(self.lengths),
        }
