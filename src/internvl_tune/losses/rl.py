"""Online RL losses as data: GRPO group advantages and the clipped GSPO / GRPO policy loss, in verl's or TRL's
conventions (docs/losses.md, "Online RL", has every convention with a worked example).

Notation. A step holds P prompts with G sampled responses each (a group); response i has reward r_i, tokens t with
log-probs logp_t under the policy, old_t under the policy that sampled it (the rollout's), ref_t under the reference,
and |y_i| tokens. ε_lo, ε_hi are `clip_ratio_low` / `clip_ratio_high`.

    advantage   A_i = (r_i − mean_group r) / (std_group r + eps)          std with Bessel's correction (n − 1)
    GRPO        ratio per token   ρ_t = exp(logp_t − old_t)                               arXiv 2402.03300
    GSPO        ratio per sequence s_i = exp(mean_{t in i}(logp_t − old_t))                arXiv 2507.18071
    loss per token  ℓ_t = max(−A_i·ρ, −A_i·clip(ρ, 1 − ε_lo, 1 + ε_hi))  (+ kl_coef·k3_t)

with ρ = ρ_t (GRPO) or s_i (GSPO), the ℓ_t aggregated by `loss_agg_mode` over the whole optimizer step (every
micro-batch, every rank; `loss_normalizer`). GSPO's ratio is applied per token in its straight-through form
log s_i,t = sg(log s_i) + logp_t − sg(logp_t): its value is s_i, and its gradient reaches each token once, so every
aggregation mode weighs a sequence's tokens alike, as the paper's (1/|y_i|)·Σ_t ∇logp_t.

Worked example (the tests' group): G = 4 rewards [1, 0, 0, 1]: mean 0.5, std sqrt(1/3) = 0.57735, so with verl's
eps = 1e-6 the advantages are ±0.5/0.577351 = ±0.866024. A response of 2 tokens with logp − old = [0.1, 0.3] has
s = exp(0.2) = 1.2214: above 1 + 0.2, so with A = +0.866 its loss is the clipped −0.866·1.2 = −1.03923 per token
(no gradient), and with A = −0.866 the unclipped +0.866·1.2214 = 1.05776 per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

RLLossType = Literal["gspo", "grpo"]
LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
RLConventionName = Literal["verl", "trl"]
ScaleRewards = Literal["group", "batch", "none", "mean"]

RL_LOSS_TYPES: tuple[str, ...] = ("gspo", "grpo")
LOSS_AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none", "mean")


@dataclass(frozen=True)
class RLConvention:
    """Where verl's and TRL's GRPO / GSPO differ in numbers; `RL_CONVENTIONS` holds the two.

    Attributes:
        name: "verl" or "trl".
        std_epsilon: added to the std in the advantage's denominator.
        single_response_advantage: a group of one response: "reward" (verl: mean 0, std 1, so A = r / (1 + eps))
            or "zero" (TRL: the group mean is the reward itself, A = 0).
        token_log_ratio_clamp: GRPO's per-token log-ratio clamped to [−c, c] before exp (None: not clamped).
        sequence_log_ratio_max: GSPO's log s_i clamped from above (value and gradient) before exp (None: not).
        dual_clip: GRPO's default dual-clip bound c (arXiv 1912.09729): for A < 0 the token loss is capped at −A·c.
        kl_clamp: k3 computed from ref − logp clamped to [−20, 20] and the result clamped to [−10, 10] (verl).
        clip_fraction_per_sequence: GSPO's clip fraction counts sequences (TRL) instead of tokens (verl).
    """

    name: str
    std_epsilon: float
    single_response_advantage: Literal["reward", "zero"]
    token_log_ratio_clamp: float | None
    sequence_log_ratio_max: float | None
    dual_clip: float | None
    kl_clamp: bool
    clip_fraction_per_sequence: bool


RL_CONVENTIONS: dict[str, RLConvention] = {
    # verl as the InternVL3.5 Cascade RL stage ran it (its core_algos.py: compute_grpo_outcome_advantage,
    # compute_policy_loss (vanilla), compute_policy_loss_gspo, kl_penalty).
    "verl": RLConvention(
        name="verl",
        std_epsilon=1e-6,
        single_response_advantage="reward",
        token_log_ratio_clamp=20.0,
        sequence_log_ratio_max=10.0,
        dual_clip=3.0,
        kl_clamp=True,
        clip_fraction_per_sequence=False,
    ),
    # TRL's GRPOTrainer (_generate_and_score_completions, _compute_loss) with importance_sampling_level="sequence"
    # for GSPO.
    "trl": RLConvention(
        name="trl",
        std_epsilon=1e-4,
        single_response_advantage="zero",
        token_log_ratio_clamp=None,
        sequence_log_ratio_max=None,
        dual_clip=None,
        kl_clamp=False,
        clip_fraction_per_sequence=True,
    ),
}


def _convention(name: str) -> RLConvention:
    if name not in RL_CONVENTIONS:
        raise ValueError(f"conventions: must be one of {', '.join(RL_CONVENTIONS)}, got {name!r}")
    return RL_CONVENTIONS[name]


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | Sequence[int] | None = None,
    *,
    conventions: str = "verl",
    scale_rewards: str = "group",
    std_epsilon: float | None = None,
) -> torch.Tensor:
    """GRPO's outcome advantage of each response: its reward minus its group's mean, over its group's std.

        A_i = (r_i − mean_g) / (std_g + eps)     scale_rewards="group" (GRPO; verl's norm_adv_by_std_in_grpo)
        A_i = (r_i − mean_g) / (std_all + eps)   "batch" (TRL's option: the std of all the step's rewards)
        A_i =  r_i − mean_g                      "none" (Dr. GRPO, arXiv 2503.20783)
        A_i = (r_i − mean_g) / (mean_g + eps)    "mean" (MaxRL, arXiv 2602.02710; 0 where mean_g = 0)

    std uses Bessel's correction (n − 1) in both conventions. A group whose rewards are all equal gets A = 0. A
    group of one response has no std: verl takes mean 0 and std 1 (A = r / (1 + eps); "none": A = r), TRL takes
    its mean as the reward (A = 0).

    "mean" weights a prompt by 1 / its pass rate: for 0/1 rewards the expected update of a prompt is then the
    supervised (log-likelihood) gradient of its right answers, where "group" gives it sqrt(p / (1 − p)) of that and
    "none" p, so the prompts a model mostly gets wrong are the ones it learns from least (docs/losses.md). It needs
    rewards >= 0 (a pass rate); a group without a positive reward has A = 0, and a one-response group follows the
    convention's rule with 1 for the denominator (verl: A = r, REINFORCE; TRL: A = 0).

    Example: rewards [[1, 0, 0, 1], [2, 2, 2, 2]], verl (eps 1e-6): group one has mean 0.5 and std
    sqrt(((0.5² · 4) / 3)) = 0.57735, so A = ±0.866024; group two has std 0 and A = 0 / 1e-6 = 0.

    Args:
        rewards: [P, G], one group per row; or [N] with `group_ids`.
        group_ids: [N], the group (prompt) of each response, any integers, groups of any size; only with [N].
        conventions: "verl" or "trl" (RL_CONVENTIONS): the std's epsilon and the one-response rule.
        scale_rewards: "group", "batch" or "none".
        std_epsilon: overrides the convention's epsilon.

    Returns:
        The advantages, detached, in the shape and dtype of `rewards`.
    """
    convention = _convention(conventions)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    eps = convention.std_epsilon if std_epsilon is None else std_epsilon
    rewards = rewards.detach()
    if scale_rewards == "mean" and bool((rewards < 0).any()):
        raise ValueError(
            f"scale_rewards=mean (MaxRL) needs rewards >= 0, a pass rate; got {float(rewards.min()):g} "
            "(a penalty term? use scale_rewards=group)"
        )
    if rewards.dim() == 2:
        if group_ids is not None:
            raise ValueError("group_advantages: rewards [P, G] are grouped by row; give group_ids only with [N]")
        num_groups, group_size = rewards.shape
        flat = rewards.reshape(-1)
        inverse = torch.arange(num_groups, device=rewards.device).repeat_interleave(group_size)
    elif rewards.dim() == 1:
        if group_ids is None:
            raise ValueError("group_advantages: rewards [N] need group_ids [N] (or give rewards as [P, G])")
        ids = torch.as_tensor(group_ids, device=rewards.device)
        if ids.shape != rewards.shape:
            raise ValueError(f"group_advantages: group_ids {tuple(ids.shape)} for rewards {tuple(rewards.shape)}")
        _, inverse = torch.unique(ids, return_inverse=True)
        num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
        flat = rewards
    else:
        raise ValueError(f"group_advantages: rewards must be [N] or [P, G], got {tuple(rewards.shape)}")

    values = flat.double()  # the group sums of squares in float64: rewards are few, precision is free
    count = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.ones_like(values)
    )
    mean = torch.zeros_like(count).index_add_(0, inverse, values) / count
    squares = torch.zeros_like(count).index_add_(0, inverse, (values - mean[inverse]) ** 2)
    std = (squares / (count - 1).clamp(min=1)).sqrt()
    single = count == 1
    pass_rate = mean  # "mean"'s denominator: the group's own mean, whatever the one-response rule does to `mean`
    if convention.single_response_advantage == "reward":
        mean, std = torch.where(single, 0.0, mean), torch.where(single, 1.0, std)
        pass_rate = torch.where(single, 1.0, pass_rate)
    if scale_rewards == "batch":
        # One std for all: a lone response still follows the one-response rule through its mean.
        batch_std = values.std(correction=1) if values.numel() > 1 else values.new_zeros(())
        std = batch_std.expand_as(std)
    centred = values - mean[inverse]
    if scale_rewards == "none":
        advantages = centred
    elif scale_rewards == "mean":
        # A group with no positive reward has no pass rate to divide by: nothing learnt from it (MaxRL's rule).
        rate = pass_rate[inverse]
        advantages = torch.where(rate > 0, centred / (rate + eps), 0.0)
    else:
        advantages = centred / (std[inverse] + eps)
    return advantages.to(rewards.dtype).reshape(rewards.shape)


@dataclass
class RLLoss:
    """The policy-loss settings of `policy_loss`, validated; `RLArgs.loss_settings()` (config.py) gives them.

    Attributes:
        loss: "gspo" (sequence-level ratio) or "grpo" (token-level PPO clip).
        loss_agg_mode: how the step's token losses become one number (verl's names): token-mean, seq-mean-token-sum,
            seq-mean-token-mean, seq-mean-token-sum-norm (each in `loss_normalizer`).
        clip_ratio_low: ε_lo, the ratio is clipped at 1 − ε_lo.
        clip_ratio_high: ε_hi, the ratio is clipped at 1 + ε_hi.
        conventions: "verl" or "trl" (RL_CONVENTIONS).
        clip_ratio_c: GRPO's dual-clip bound c > 1 (0 = off); None = the convention's (verl 3.0, TRL none).
        kl_coef: weight of the k3 KL estimate to the reference, added to every token's loss (0 = off).
        norm_length: seq-mean-token-sum-norm's constant divisor L (the rollouts' most new tokens).
    """

    loss: RLLossType
    loss_agg_mode: LossAggMode
    clip_ratio_low: float
    clip_ratio_high: float
    conventions: RLConventionName
    clip_ratio_c: float | None = None
    kl_coef: float = 0.0
    norm_length: int | None = None

    def __post_init__(self) -> None:
        if self.loss not in RL_LOSS_TYPES:
            raise ValueError(f"loss: must be one of {', '.join(RL_LOSS_TYPES)}, got {self.loss!r}")
        if self.loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg_mode: must be one of {', '.join(LOSS_AGG_MODES)}, got {self.loss_agg_mode!r}")
        _convention(self.conventions)
        if not 0 <= self.clip_ratio_low < 1:
            raise ValueError(f"clip_ratio_low: must be in [0, 1), got {self.clip_ratio_low}")
        if self.clip_ratio_high < 0:
            raise ValueError(f"clip_ratio_high: must be >= 0, got {self.clip_ratio_high}")
        if self.clip_ratio_c is not None:
            if self.loss == "gspo":
                raise ValueError(
                    "clip_ratio_c: dual-clip is a grpo setting (GSPO clips the sequence ratio only, as verl's does); "
                    "unset it (null)"
                )
            if self.clip_ratio_c != 0 and self.clip_ratio_c <= 1:
                raise ValueError(f"clip_ratio_c: must be > 1 (or 0 = off), got {self.clip_ratio_c}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef: must be >= 0, got {self.kl_coef}")
        if self.loss_agg_mode == "seq-mean-token-sum-norm":
            if self.norm_length is None or self.norm_length < 1:
                raise ValueError(
                    f"norm_length: loss_agg_mode=seq-mean-token-sum-norm divides by a constant length; set it to the "
                    f"rollouts' most new tokens (>= 1), got {self.norm_length}"
                )

    @property
    def convention(self) -> RLConvention:
        return RL_CONVENTIONS[self.conventions]

    @property
    def dual_clip(self) -> float | None:
        """The dual-clip bound in force: GRPO's clip_ratio_c, or the convention's when unset; None = off."""
        if self.loss != "grpo":
            return None
        c = self.convention.dual_clip if self.clip_ratio_c is None else self.clip_ratio_c
        return c or None


def loss_normalizer(
    num_tokens: Sequence[int] | torch.Tensor, loss_agg_mode: str, norm_length: int | None = None
) -> float:
    """The denominator of `loss_agg_mode` over responses with `num_tokens` loss tokens each, a CPU number.

    Additive: the step's normalizer is the sum of this over its micro-batches and ranks, and `policy_loss` given it
    returns each micro-batch's share, so the shares add up to the step's loss however the responses are split (with
    DDP, which averages gradients over ranks, multiply the loss by the world size).

        token-mean               L = Σ_i Σ_t ℓ_t / Σ_i |y_i|              normalizer Σ_i |y_i|
        seq-mean-token-sum       L = Σ_i Σ_t ℓ_t / N                      normalizer N
        seq-mean-token-mean      L = Σ_i (Σ_t ℓ_t / |y_i|) / N            normalizer N
        seq-mean-token-sum-norm  L = Σ_i Σ_t ℓ_t / (N · L_norm)           normalizer N · L_norm (Dr. GRPO)

    N counts the responses with at least one loss token: a response masked out entirely has weight 0 (verl divides
    by its 0 tokens in seq-mean-token-mean, a nan).

    Example: responses of 2 and 4 tokens: token-mean 6, seq-mean-* 2, seq-mean-token-sum-norm with L_norm 8: 16.
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode: must be one of {', '.join(LOSS_AGG_MODES)}, got {loss_agg_mode!r}")
    counts = [int(n) for n in (num_tokens.tolist() if isinstance(num_tokens, torch.Tensor) else num_tokens)]
    if loss_agg_mode == "token-mean":
        return float(sum(counts))
    num_sequences = float(sum(1 for n in counts if n > 0))
    if loss_agg_mode == "seq-mean-token-sum-norm":
        if norm_length is None:
            raise ValueError("loss_agg_mode=seq-mean-token-sum-norm needs norm_length")
        return num_sequences * norm_length
    return num_sequences


@dataclass
class RLLossOutput:
    """What one micro-batch's `policy_loss` returns.

    Attributes:
        loss: this micro-batch's share of the step's loss, to backpropagate (policy term + kl_coef · KL term).
        terms: the shares of each term, detached: "policy" and, with kl_coef > 0, "kl" (unweighted).
        stats: detached sums and counts that add up over micro-batches and ranks (sum them, then `rl_metrics`):
            tokens, sequences; clip_units (tokens, or sequences under TRL's GSPO), clipped_low, clipped_high,
            clipped_dual (dual-clip engaged, GRPO) in clip units; ratio_sum (over clip units); log_ratio_sum
            (Σ_t logp_t − old_t); kl_sum (Σ_t k3_t, with kl_coef > 0).
        ratio_max: the largest ratio of the micro-batch (ρ_t or s_i; 0 without tokens), detached.
        ratio_min: the smallest (0 without tokens), detached.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    ratio_max: torch.Tensor
    ratio_min: torch.Tensor


def rl_metrics(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Means from `RLLossOutput.stats` (one micro-batch's, or summed over a step): clip_fraction (low + high +
    dual), clip_fraction_low, clip_fraction_high, clip_fraction_dual, ratio_mean, approx_kl (verl's ppo_kl: the
    token mean of old − logp) and, when present, kl (the token mean of k3)."""
    units = stats["clip_units"].clamp(min=1)
    tokens = stats["tokens"].clamp(min=1)
    metrics = {
        "clip_fraction": (stats["clipped_low"] + stats["clipped_high"] + stats["clipped_dual"]) / units,
        "clip_fraction_low": stats["clipped_low"] / units,
        "clip_fraction_high": stats["clipped_high"] / units,
        "clip_fraction_dual": stats["clipped_dual"] / units,
        "ratio_mean": stats["ratio_sum"] / units,
        "approx_kl": -stats["log_ratio_sum"] / tokens,
    }
    if "kl_sum" in stats:
        metrics["kl"] = stats["kl_sum"] / tokens
    return metrics


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Schulman's k3 estimate of KL(π || π_ref) per token (http://joschu.net/blog/kl-approx.html), verl's
    `low_var_kl` and TRL's per_token_kl: with x = ref − logp, k3 = e^x − x − 1 >= 0 (0 where they agree).

    clamp (verl): x clamped to [−20, 20], k3 to [−10, 10]. Example: logp = −1, ref = −2: x = −1,
    k3 = e^−1 + 1 − 1 = 0.367879; logp = −30, ref = 0: x = 30 -> 20, k3 = e^20 − 21 -> 10 (TRL: e^30 − 31).
    """
    x = ref_logp - logp
    if clamp:
        x = x.clamp(-20.0, 20.0)
    kl = torch.exp(x) - x - 1
    return kl.clamp(-10.0, 10.0) if clamp else kl


def _flatten(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None,
    seq_ids: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int]:
    """The loss tokens as flat [T'] tensors (logp, old, ref) with the sequence index of each, and the count S."""
    if logp.shape != old_logp.shape or (ref_logp is not None and ref_logp.shape != logp.shape):
        raise ValueError(f"policy_loss: logp {tuple(logp.shape)}, old_logp and ref_logp must have one shape")
    num_sequences = advantages.shape[0]
    if logp.dim() == 2:
        if seq_ids is not None or mask is None or mask.shape != logp.shape:
            raise ValueError("policy_loss: padded logp [B, L] needs mask [B, L] (and no seq_ids)")
        if num_sequences != logp.shape[0]:
            raise ValueError(f"policy_loss: {num_sequences} advantages for {logp.shape[0]} rows")
        seq_ids = torch.arange(logp.shape[0], device=logp.device)[:, None].expand_as(logp)
    elif logp.dim() == 1:
        if seq_ids is None or seq_ids.shape != logp.shape:
            raise ValueError("policy_loss: flat logp [T] needs seq_ids [T] (the response of each token, -1: none)")
        seq_ids = seq_ids.to(logp.device)
    else:
        raise ValueError(f"policy_loss: logp must be [B, L] or [T], got {tuple(logp.shape)}")
    keep = seq_ids >= 0
    if mask is not None:
        keep = keep & mask.to(torch.bool)
    ref = None if ref_logp is None else ref_logp[keep].float()
    return logp[keep].float(), old_logp[keep].float(), ref, seq_ids[keep], num_sequences


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    settings: RLLoss,
    seq_ids: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    normalizer: float | torch.Tensor | None = None,
) -> RLLossOutput:
    """This micro-batch's share of the step's clipped GSPO or GRPO loss (module docstring; docs/losses.md).

    Per token of response i (ρ = s_i for GSPO, ρ_t for GRPO):

        ℓ_t = max(−A_i·ρ, −A_i·clip(ρ, 1 − ε_lo, 1 + ε_hi))
        ℓ_t = min(ℓ_t, −A_i·c)          GRPO with dual-clip c, where A_i < 0
        ℓ_t += kl_coef · k3(logp_t, ref_t)

    then Σ over the micro-batch as `settings.loss_agg_mode` weighs it, over `normalizer` (`loss_normalizer` summed
    over the step's micro-batches and ranks; default this micro-batch's own, the micro-batch being the step).

    Example (GSPO, verl, seq-mean-token-mean, ε 0.2): one response, logp − old = [0.1, 0.3], A = −0.866: s =
    exp(0.2) = 1.2214 > 1.2, the unclipped term is the larger, ℓ_t = 0.866·1.2214 = 1.05776 for both tokens, the
    loss 1.05776, clip fraction 0.

    Args:
        logp: the policy's log-prob of each response token, with gradients: padded [B, L] or flat [T] (packed rows).
        old_logp: the same under the sampling policy, same shape, no gradient needed.
        advantages: one per response, [B] (`group_advantages`).
        mask: [B, L] with padded logp (1 = a loss token); optional with flat logp.
        settings: the loss settings.
        seq_ids: [T] with flat logp: the response (0..B-1) of each token, -1 for tokens outside any response.
        ref_logp: the reference's log-probs, same shape as logp; needed with kl_coef > 0.
        normalizer: the step's `loss_normalizer`; default: this micro-batch's.
    """
    convention = settings.convention
    if settings.kl_coef > 0 and ref_logp is None:
        raise ValueError("policy_loss: kl_coef > 0 needs ref_logp, the reference's log-probs")
    lp, old, ref, seq, num_sequences = _flatten(logp, old_logp, advantages, mask, seq_ids, ref_logp)
    old = old.detach()
    adv_seq = advantages.detach().to(lp.dtype)
    zeros = lp.new_zeros(num_sequences)
    num_tokens = zeros.index_add(0, seq, torch.ones_like(lp))  # [S]
    log_ratio = lp - old  # [T']

    if settings.loss == "gspo":
        seq_log_ratio = zeros.index_add(0, seq, log_ratio) / num_tokens.clamp(min=1)  # log s_i, [S]
        if convention.name == "verl":
            token_log_ratio = seq_log_ratio.detach()[seq] + lp - lp.detach()
        else:  # TRL: the sequence mean itself, its gradient spread over the sequence's tokens
            token_log_ratio = seq_log_ratio[seq]
        if convention.sequence_log_ratio_max is not None:
            token_log_ratio = token_log_ratio.clamp(max=convention.sequence_log_ratio_max)
    else:
        token_log_ratio = log_ratio
        if convention.token_log_ratio_clamp is not None:
            token_log_ratio = token_log_ratio.clamp(-convention.token_log_ratio_clamp, convention.token_log_ratio_clamp)
    ratio = torch.exp(token_log_ratio)  # [T']
    adv = adv_seq[seq]
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - settings.clip_ratio_low, 1 + settings.clip_ratio_high)
    token_loss = torch.maximum(unclipped, clipped)
    r = ratio.detach()
    is_high = (adv > 0) & (r > 1 + settings.clip_ratio_high)
    is_low = (adv < 0) & (r < 1 - settings.clip_ratio_low)
    is_dual = torch.zeros_like(is_high)
    if settings.dual_clip is not None:
        cap = -adv * settings.dual_clip
        is_dual = (adv < 0) & (token_loss.detach() > cap)
        token_loss = torch.where(adv < 0, torch.minimum(token_loss, cap), token_loss)

    if normalizer is None:
        normalizer = loss_normalizer(num_tokens, settings.loss_agg_mode, settings.norm_length)
    per_token_weight = (1 / num_tokens.clamp(min=1))[seq] if settings.loss_agg_mode == "seq-mean-token-mean" else 1.0

    def share(values: torch.Tensor) -> torch.Tensor:
        # Σ over the micro-batch, weighted per the mode, over the step's denominator; 0 for a step without tokens.
        denominator = normalizer.clamp(min=1e-12) if isinstance(normalizer, torch.Tensor) else max(normalizer, 1e-12)
        return (values * per_token_weight).sum() / denominator

    policy_term = share(token_loss)
    loss = policy_term
    terms = {"policy": policy_term.detach()}
    stats: dict[str, torch.Tensor] = {}
    if settings.kl_coef > 0:
        kl = k3_kl(lp, ref.detach(), clamp=convention.kl_clamp)
        kl_term = share(kl)
        loss = loss + settings.kl_coef * kl_term
        terms["kl"] = kl_term.detach()
        stats["kl_sum"] = kl.detach().sum()

    if settings.loss == "gspo" and convention.clip_fraction_per_sequence:
        # One vote per response: the ratio and the flags are the same on all of its tokens.
        present = num_tokens > 0

        def per_sequence(values: torch.Tensor) -> torch.Tensor:
            return zeros.detach().index_put((seq,), values.to(zeros.dtype))[present]

        ratio_units = per_sequence(r)
        clip_units = present.sum().to(r.dtype)
        clipped_low, clipped_high = per_sequence(is_low).sum(), per_sequence(is_high).sum()
    else:
        ratio_units = r
        clip_units = torch.tensor(float(r.numel()), device=r.device)
        clipped_low, clipped_high = is_low.sum().to(r.dtype), is_high.sum().to(r.dtype)
    stats.update(
        tokens=num_tokens.sum().detach(),
        sequences=(num_tokens > 0).sum().to(r.dtype),
        clip_units=clip_units,
        clipped_low=clipped_low,
        clipped_high=clipped_high,
        clipped_dual=is_dual.sum().to(r.dtype),
        ratio_sum=ratio_units.sum(),
        log_ratio_sum=log_ratio.detach().sum(),
    )
    empty = ratio_units.numel() == 0
    return RLLossOutput(
        loss=loss,
        terms=terms,
        stats=stats,
        ratio_max=r.new_zeros(()) if empty else ratio_units.max(),
        ratio_min=r.new_zeros(()) if empty else ratio_units.min(),
    )
