"""Summed response log-probs from logits, read at explicit positions (shared-prefix and separate layouts)."""

from __future__ import annotations

import torch


def gather_logps(
    logits: torch.Tensor,  # [R, T, V]
    rows: torch.Tensor,  # [B]
    positions: torch.Tensor,  # [B, L]
    targets: torch.Tensor,  # [B, L]
    mask: torch.Tensor,  # [B, L] bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair sums of log p(target | logits at position) over masked tokens, and the token counts.

    Only the gathered positions go through log_softmax (in fp32), not the whole [R, T, V] tensor.
    Example: rows [0], positions [[3, 4]], targets [[7, 9]] -> log_softmax(logits[0, 3])[7] + (...)[0, 4][9].

    Returns:
        (sum_logps [B] fp32, num_tokens [B] long).
    """
    picked = logits[rows.unsqueeze(1), positions].float()  # [B, L, V]
    token_logps = torch.log_softmax(picked, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, L]
    return (token_logps * mask).sum(-1), mask.sum(-1)
