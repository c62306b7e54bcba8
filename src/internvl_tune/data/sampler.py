"""A resumable, rank-sharded batch sampler: exact O(1) resume of the data stream."""

from __future__ import annotations

from collections.abc import Iterator

import torch


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
            raise ValueError(
                f"{num_samples} samples cannot fill one global batch of {batch_size} x {num_replicas} processes"
            )

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.num_replicas)

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
