"""Pairwise preference losses on summed response log-probs: the trl 0.10.1 `dpo_loss` family
(docs/original-differences.md §6.3).

Every loss here takes per-pair tensors [B] and returns per-pair losses [B]; reduction (a mean over the micro-batch,
or a sum divided by the number of pairs in the whole step) is the caller's choice.

Notation (docs/original-differences.md §6.1): `π` the policy, `π0` the frozen reference, `β` beta, and for one pair

    Δc = log π(yc|x) − log π0(yc|x)        Δr = log π(yr|x) − log π0(yr|x)        s = β·(Δc − Δr)

where each log-prob is a SUM over the response tokens. Only `ipo` uses length-averaged log-probs: it is given the
summed ones plus the response lengths and divides itself.

Worked example used across the docstrings and tests: log π(yc) = −1, log π(yr) = −3, log π0(yc) = log π0(yr) = −2,
β = 0.5. Then Δc = 1, Δr = −1, s = 0.5·(1 − (−1)) = 1 and the DPO loss is −log σ(1) = log(1 + e^−1) = 0.31326.

Not supported: `aot` / `aot_pair` (they sort log-ratios over the batch, so a pair's loss depends on the other pairs
in its micro-batch) and `apo_*` (not offered by the original, docs/original-differences.md §6.3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PREFERENCE_LOSS_TYPES = ("sigmoid", "bco_pair", "hinge", "ipo", "robust", "sppo_hard", "nca_pair", "exo_pair")

# The default the original gets from trl when exo_pair runs with label_smoothing 0 (log 0 would be -inf).
EXO_DEFAULT_LABEL_SMOOTHING = 1e-3


def sigmoid_loss(logratio_margin: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO, optionally with conservative label smoothing (cDPO).

    With s = β·(Δc − Δr):  L = −(1 − ls)·log σ(s) − ls·log σ(−s)

    Example: s = 1, ls = 0 -> 0.31326; ls = 0.1 -> 0.9·0.31326 + 0.1·1.31326 = 0.41326.

    Paper: https://arxiv.org/abs/2305.18290 (DPO).

    Args:
        logratio_margin: Δc − Δr, [B].
        beta: β.
        label_smoothing: ls, the assumed probability that a pair's preference label is flipped.
    """
    s = beta * logratio_margin
    return -(1 - label_smoothing) * F.logsigmoid(s) - label_smoothing * F.logsigmoid(-s)


def robust_loss(logratio_margin: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO: an unbiased estimate of the DPO loss under label noise of rate ls.

    With s = β·(Δc − Δr):  L = [−(1 − ls)·log σ(s) + ls·log σ(−s)] / (1 − 2·ls)

    Example: s = 1, ls = 0.1 -> (0.9·0.31326 − 0.1·1.31326) / 0.8 = 0.18826.

    Paper: https://arxiv.org/abs/2403.00409 (Provably Robust DPO).

    Args:
        logratio_margin: Δc − Δr, [B].
        beta: β.
        label_smoothing: ls in [0, 0.5).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    s = beta * logratio_margin
    return (-(1 - label_smoothing) * F.logsigmoid(s) + label_smoothing * F.logsigmoid(-s)) / (1 - 2 * label_smoothing)


def hinge_loss(logratio_margin: torch.Tensor, beta: float) -> torch.Tensor:
    """Hinge loss on the DPO margin (as in SLiC).

    With s = β·(Δc − Δr):  L = relu(1 − s)

    Example: s = 1 -> 0; s = −1 -> 2.

    Paper: https://arxiv.org/abs/2305.10425 (SLiC-HF).

    Args:
        logratio_margin: Δc − Δr, [B].
        beta: β.
    """
    return torch.relu(1 - beta * logratio_margin)


def ipo_loss(mean_logratio_margin: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: a squared loss that pulls the margin of LENGTH-AVERAGED log-ratios towards 1/(2β).

    With Δ̄ the log-ratio of per-token mean log-probs (sum / number of response tokens):
    L = (Δ̄c − Δ̄r − 1/(2β))²

    Example: lengths 2 (chosen) and 4 (rejected) in the worked example: Δ̄c = −1/2 + 2/2 = 0.5,
    Δ̄r = −3/4 + 2/4 = −0.25, β = 0.5 -> (0.75 − 1)² = 0.0625.

    Paper: https://arxiv.org/abs/2310.12036 (IPO, "A General Theoretical Paradigm to Understand Learning from
    Human Preferences").

    Args:
        mean_logratio_margin: Δ̄c − Δ̄r, [B].
        beta: β.
    """
    return (mean_logratio_margin - 1 / (2 * beta)) ** 2


def bco_pair_loss(
    chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float, delta: float | torch.Tensor
) -> torch.Tensor:
    """BCO on pairs: each response is classified on its own, chosen as "good" and rejected as "bad".

    L = −log σ(β·Δc − δ) − log σ(−(β·Δr − δ)), δ the running mean reward (`RunningRewardMean`,
    docs/original-differences.md §6.4).

    Example: Δc = 1, Δr = −1, β = 0.5, δ = 0.25 -> −log σ(0.25) − log σ(0.75) = 0.57594 + 0.38687 = 0.96281.

    Paper: https://arxiv.org/abs/2404.04656 (Binary Classifier Optimization).

    Args:
        chosen_logratios: Δc, [B].
        rejected_logratios: Δr, [B].
        beta: β.
        delta: δ, a scalar.
    """
    return -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))


def sppo_hard_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO with hard labels: the chosen log-ratio is pulled to +1/(2β), the rejected one to −1/(2β).

    L = (Δc − 0.5/β)² + (Δr + 0.5/β)²

    Example: Δc = 1, Δr = −1, β = 0.5 -> (1 − 1)² + (−1 + 1)² = 0; Δc = −1, Δr = 1 -> 4 + 4 = 8.

    Paper: https://arxiv.org/abs/2405.00675 (Self-Play Preference Optimization).

    Args:
        chosen_logratios: Δc, [B].
        rejected_logratios: Δr, [B].
        beta: β.
    """
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def nca_pair_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA on pairs: absolute (not relative) likelihood of the chosen response, and a push-down on both.

    L = −log σ(β·Δc) − 0.5·log σ(−β·Δc) − 0.5·log σ(−β·Δr)

    Example: β·Δc = 0.5, β·Δr = −0.5 -> 0.47408 + 0.5·0.97408 + 0.5·0.47408 = 1.19815.

    Paper: https://arxiv.org/abs/2402.05369 (Noise Contrastive Alignment).

    Args:
        chosen_logratios: Δc, [B].
        rejected_logratios: Δr, [B].
        beta: β.
    """
    chosen_rewards = beta * chosen_logratios
    rejected_rewards = beta * rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def exo_pair_loss(logratio_margin: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """EXO on pairs: reverse KL from the policy's pair preference σ(s) to the smoothed label (1 − ls, ls).

    With s = β·(Δc − Δr):  L = σ(s)·(log σ(s) − log(1 − ls)) + σ(−s)·(log σ(−s) − log ls)

    ls = 0 is replaced by 1e-3, as trl does (log 0 is −inf).

    Example: s = 1, ls = 0.1 -> 0.73106·(−0.31326 + 0.10536) + 0.26894·(−1.31326 + 2.30259) = 0.11408.

    Paper: https://arxiv.org/abs/2402.00856 (Efficient Exact Optimization).

    Args:
        logratio_margin: Δc − Δr, [B].
        beta: β.
        label_smoothing: ls in [0, 1).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"exo_pair loss: label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing == 0.0:
        label_smoothing = EXO_DEFAULT_LABEL_SMOOTHING
    s = beta * logratio_margin
    return torch.sigmoid(s) * (F.logsigmoid(s) - math.log(1 - label_smoothing)) + torch.sigmoid(-s) * (
        F.logsigmoid(-s) - math.log(label_smoothing)
    )


def logratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Δc = log π(yc|x) − log π0(yc|x) and Δr = log π(yr|x) − log π0(yr|x), [B] each: what every loss and the
    rewards are made of (one place, so the rewards that move the BCO shift δ are the ones the loss sees)."""
    return policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps


def preference_loss(
    loss_type: str,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    delta: float | torch.Tensor = 0.0,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair loss of one type, from summed response log-probs (docs/original-differences.md §6.3).

    Example (the worked example in the module docstring): `preference_loss("sigmoid", t(-1.), t(-3.), t(-2.), t(-2.),
    beta=0.5)` is −log σ(1) = 0.31326.

    Args:
        loss_type: one of PREFERENCE_LOSS_TYPES.
        policy_chosen_logps: log π(yc|x) summed over the response tokens, [B].
        policy_rejected_logps: log π(yr|x), [B].
        ref_chosen_logps: log π0(yc|x), [B].
        ref_rejected_logps: log π0(yr|x), [B].
        beta: β.
        delta: the BCO reward shift δ (`bco_pair` only).
        label_smoothing: ls (`sigmoid`, `robust`, `exo_pair` only).
        chosen_lengths: number of response tokens of each chosen response, [B] (`ipo` only, required there).
        rejected_lengths: the same for the rejected responses (`ipo` only, required there).

    Returns:
        Per-pair losses, [B].
    """
    if label_smoothing < 0:
        raise ValueError(f"label_smoothing must be >= 0, got {label_smoothing}")
    chosen_logratios, rejected_logratios = logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )  # Δc, Δr [B]
    margin = chosen_logratios - rejected_logratios  # [B]
    if loss_type == "sigmoid":
        return sigmoid_loss(margin, beta, label_smoothing)
    if loss_type == "robust":
        return robust_loss(margin, beta, label_smoothing)
    if loss_type == "hinge":
        return hinge_loss(margin, beta)
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo loss needs chosen_lengths and rejected_lengths (number of response tokens per pair)")
        # The policy and the reference score the same tokens, so dividing Δ by the length averages both log-probs.
        return ipo_loss(chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths, beta)
    if loss_type == "bco_pair":
        return bco_pair_loss(chosen_logratios, rejected_logratios, beta, delta)
    if loss_type == "sppo_hard":
        return sppo_hard_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "nca_pair":
        return nca_pair_loss(chosen_logratios, rejected_logratios, beta)
    if loss_type == "exo_pair":
        return exo_pair_loss(margin, beta, label_smoothing)
    raise ValueError(f"unknown preference loss_type {loss_type!r}; known: {', '.join(PREFERENCE_LOSS_TYPES)}")


def rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit DPO rewards β·Δc and β·Δr, detached, reported for every loss type
    (docs/original-differences.md §6.3).

    The one reward formula: the objective's logged rewards, the BCO shift δ the recipe folds them into, and the
    reward accuracy of `evaluate/preference.py` all come from here.

    Example: the worked example gives chosen 0.5·1 = 0.5 and rejected 0.5·(−1) = −0.5.

    Returns:
        (chosen_rewards [B], rejected_rewards [B]).
    """
    chosen_logratios, rejected_logratios = logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
