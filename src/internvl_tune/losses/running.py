"""The BCO reward shift δ: a cumulative mean of per-rank mean rewards, as a small checkpointable object.

What the original does and what we change: docs/original-differences.md §6.4.
"""

from __future__ import annotations

import torch

# trl's RunningMoments starts the count just above 0, so the first update replaces the initial mean of 0 exactly.
_INITIAL_COUNT = 1e-24


class RunningRewardMean:
    """Equal-weight mean of every per-rank, per-micro-batch mean reward seen so far; `bco_pair` uses it as δ.

    Each micro-batch, each rank contributes one scalar r = mean(cat(β·Δc, β·Δr)) over its local pairs
    (`local_mean`). The recipe sums r over ranks (an all-reduce, kept out of this module) and calls
    `update(sum_of_r, num_ranks)`, which folds the batch mean sum_of_r / num_ranks with weight n = num_ranks:

        mean += (batch_mean − mean) · n / (count + n)        count += n

    starting from mean = 0, count = 1e-24. δ is the mean AFTER the update, so the current micro-batch counts.

    Example: two ranks with r = 1 and 3 -> update(4, 2) = 2.0; then r = 2 and 2 -> update(4, 2) = 2.0; then one
    rank with r = 5 -> update(5, 1) = 2 + (5 − 2)·1/5 = 2.6 = (1 + 3 + 2 + 2 + 5) / 5.

    Fixes against the original: the recipe updates it on training micro-batches only (the original also
    moves it on every eval batch), and it is saved in checkpoints through `state_dict` (the original resets δ to 0
    on resume).

    Usage in a recipe, per training micro-batch (device tensors throughout: no wait for the device):

        chosen_rewards, rejected_rewards = rewards(...)
        local = torch.stack([RunningRewardMean.local_mean(chosen_rewards, rejected_rewards), one])
        dist.all_reduce(local)  # SUM over ranks
        delta = running.update(local[0], local[1])

    `mean` and `count` become device tensors once updated with tensors; `state_dict` reads them as floats.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = _INITIAL_COUNT

    @staticmethod
    def local_mean(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
        """This rank's scalar: the mean of its 2·B rewards, mean(cat(chosen_rewards, rejected_rewards)).

        Example: chosen [0.5, −0.5], rejected [−0.5, 1.5] -> (0.5 − 0.5 − 0.5 + 1.5) / 4 = 0.25.
        """
        return torch.cat([chosen_rewards.detach(), rejected_rewards.detach()]).double().mean()

    def update(self, rank_means_sum: float | torch.Tensor, num_ranks: int | torch.Tensor) -> float | torch.Tensor:
        """Fold in one micro-batch from every rank and return δ, the mean after the update.

        Args:
            rank_means_sum: the sum over ranks of each rank's `local_mean`.
            num_ranks: the number of ranks that contributed. A tensor may be 0 (every rank's pairs were skipped):
                then δ is unchanged, decided on the device.
        """
        if isinstance(num_ranks, torch.Tensor):
            num_ranks = num_ranks.to(torch.float64)
            batch_mean = rank_means_sum / num_ranks.clamp(min=1)
        else:
            if num_ranks < 1:
                raise ValueError(f"RunningRewardMean.update: num_ranks must be >= 1, got {num_ranks}")
            batch_mean = rank_means_sum / num_ranks
        self.mean = self.mean + (batch_mean - self.mean) * num_ranks / (self.count + num_ranks)
        self.count = self.count + num_ranks
        return self.mean

    def state_dict(self) -> dict[str, float]:
        """Plain floats, JSON-serialisable."""
        return {"mean": float(self.mean), "count": float(self.count)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        missing = {"mean", "count"} - set(state)
        if missing:
            raise ValueError(f"RunningRewardMean state is missing {sorted(missing)}; got keys {sorted(state)}")
        self.mean = float(state["mean"])
        self.count = float(state["count"])

    def __repr__(self) -> str:
        return f"RunningRewardMean(mean={float(self.mean)}, count={float(self.count):g})"
