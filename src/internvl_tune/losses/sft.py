"""The supervised (next-token) loss, as a sum and a count so recipes can normalise globally."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from internvl_tune.constants import IGNORE_INDEX


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over labelled positions, and their count.

    Position t predicts labels[t + 1]; positions whose next label is IGNORE_INDEX do not count. Dividing the sum
    by the number of labelled tokens in the whole optimizer step (all micro-batches, all ranks) gives the global
    token mean (the original takes a mean per micro-batch and then averages those, docs/original-differences.md §5).

    Example: labels [-100, 5, 7] score logits[0] against 5 and logits[1] against 7: count 2.

    Args:
        logits: [B, T, V].
        labels: [B, T] with IGNORE_INDEX where no loss is taken.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())
