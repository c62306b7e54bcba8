"""The MPO objective as data: a weighted mix of preference losses plus an SFT term on the chosen response
(docs/original-differences.md §6.1, §6.5).

MPO (https://arxiv.org/abs/2411.10442) is `PreferenceObjective(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])`.
Over the P pairs of one optimizer step (every micro-batch, every rank):

    L = (1/P)·Σ_pairs (0.8·L_sigmoid + 0.2·L_bco_pair) + 1.0·L_sft

    L_sft = Σ_pairs NLL(yc) / Σ_pairs |yc|          sft_reduction="token" (the original: a token mean)
    L_sft = (1/P)·Σ_pairs NLL(yc) / |yc|             sft_reduction="sample" (the paper's −log π(yc|x)/|yc|)
    L_sft = Σ_pairs NLL(yc)/√|yc| / Σ_pairs √|yc|    sft_reduction="square" (SFT's loss_reduction rule)

with NLL(yc) = −log π(yc|x), the chosen response's summed negative log-likelihood, and |yc| its token count. Each
micro-batch returns its share of L (its pairs' sums over the step's P and Σ|yc|), so the backward passes of a step add
up to L. With one pair per step this is exactly the original's per-micro-batch mean.

Example (the SFT term): two pairs with NLL(yc) = 1 over 2 tokens and 4 over 4 tokens. token: L_sft = (1 + 4) / (2 + 4) = 0.8333; sample: (1/2 + 4/4) / 2 = 0.75. As two micro-batches
of one pair each, told P = 2 and Σ|yc| = 6, the token shares are 1/6 and 4/6, the sample shares 0.25 and 0.5.

The loss-mix settings (`loss_type`, `loss_weights` and the original's `sigmoid_loss_weight`, `bco_pair_loss_weight`,
`rpo_alpha`) are read in one place, `resolve_loss_mix`; docs/losses.md has the table of accepted spellings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from internvl_tune.losses.preference import PREFERENCE_LOSS_TYPES, preference_loss, rewards
from internvl_tune.losses.reduction import LOSS_REDUCTIONS, LossReduction, token_weights

SFT_LOSS_TYPE = "sft"
LOSS_TYPES = (*PREFERENCE_LOSS_TYPES, SFT_LOSS_TYPE)

# The default mix: loss_type [sigmoid, bco_pair, sft] with loss_weights unset means these weights.
MPO_LOSS_TYPES = ("sigmoid", "bco_pair", "sft")
MPO_LOSS_WEIGHTS = (0.8, 0.2, 1.0)

# The original has a weight field only for these two (docs/original-differences.md §6.5); other types cannot be
# weighted in its spelling.
_ORIGINAL_WEIGHT_FIELDS = ("sigmoid", "bco_pair")
_USES_LABEL_SMOOTHING = ("sigmoid", "robust", "exo_pair")


def resolve_loss_mix(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    *,
    rpo_alpha: float | None = None,
    sigmoid_loss_weight: float | None = None,
    bco_pair_loss_weight: float | None = None,
) -> tuple[list[str], list[float]]:
    """The loss types and their weights from either spelling of the mix; config validation and the recipe both
    read the settings through here (docs/losses.md, "Accepted spellings", lists every case).

    - `loss_weights` given: one weight per entry of `loss_type` (a list or a comma-separated string), "sft"
      included; the original's weight fields must then be unset.
    - `loss_weights` unset and none of the original's fields set: the MPO mix [sigmoid, bco_pair, sft] gets
      MPO's weights [0.8, 0.2, 1.0]; a single type gets 1.0.
    - Otherwise the original's spelling: `sigmoid_loss_weight` / `bco_pair_loss_weight` weigh those types in a
      combination (1.0 when unset; ignored, with a warning, for a single type, as the original does), and
      `rpo_alpha` appends an "sft" term with that weight.

    Example: `resolve_loss_mix("sigmoid", rpo_alpha=1.0)` is `(["sigmoid", "sft"], [1.0, 1.0])` (RPO).

    Raises:
        ValueError: a spelling the table does not accept; the message names the field to change.
    """
    types = [t.strip() for t in (loss_type.split(",") if isinstance(loss_type, str) else loss_type)]
    original_fields = {
        "rpo_alpha": rpo_alpha,
        "sigmoid_loss_weight": sigmoid_loss_weight,
        "bco_pair_loss_weight": bco_pair_loss_weight,
    }
    given_original = sorted(name for name, value in original_fields.items() if value is not None)
    if loss_weights is not None:
        if given_original:
            raise ValueError(
                f"loss_weights: cannot be combined with {given_original} (the original spelling); give every "
                "weight, 'sft' included, in loss_weights, or unset loss_weights (null)"
            )
        return types, [float(w) for w in loss_weights]
    if not given_original and tuple(types) == MPO_LOSS_TYPES:
        return types, list(MPO_LOSS_WEIGHTS)
    if SFT_LOSS_TYPE in types:
        if rpo_alpha is not None:
            raise ValueError(
                f"loss_type: {types} lists 'sft' and rpo_alpha gives its weight too; drop 'sft' from loss_type "
                "(the original spelling) or give loss_weights instead of rpo_alpha"
            )
        raise ValueError(
            f"loss_type: {types} lists 'sft' but loss_weights is unset; give one weight per type in loss_weights, "
            "or drop 'sft' and give its weight as rpo_alpha (the original spelling)"
        )
    if len(types) == 1:
        ignored = [name for name in ("sigmoid_loss_weight", "bco_pair_loss_weight") if name in given_original]
        if ignored:
            # The original applies the per-type weights only when loss_type is a comma-separated combination.
            warnings.warn(f"{ignored} ignored for the single loss_type {types[0]!r}", stacklevel=2)
        weights = [1.0]
    else:
        unweighted = [t for t in types if t not in _ORIGINAL_WEIGHT_FIELDS]
        if unweighted:
            raise ValueError(
                f"loss_type: {unweighted} have no *_loss_weight field in the original spelling "
                f"(only {', '.join(_ORIGINAL_WEIGHT_FIELDS)}); give loss_weights, one per type"
            )
        per_type = {"sigmoid": sigmoid_loss_weight, "bco_pair": bco_pair_loss_weight}
        weights = [1.0 if per_type[t] is None else float(per_type[t]) for t in types]
    if rpo_alpha is not None:
        types.append(SFT_LOSS_TYPE)
        weights.append(float(rpo_alpha))
    return types, weights


@dataclass
class ObjectiveOutput:
    """What one micro-batch's objective returns.

    Attributes:
        loss: this micro-batch's share of the step's loss, to backpropagate: Σ_t w_t·terms[t] (with gradients).
        terms: each term's share of the step's value, unweighted and detached, keyed by loss type ("sigmoid",
            "bco_pair", "sft", ...): Σ_pairs loss_t / num_pairs_in_step for a preference type, the SFT share for
            "sft". Summed over the step's micro-batches and ranks they are the step's terms, for logging.
        chosen_rewards: β·Δc, detached, [B]. Not weighted: the original sums the rewards of each sub-loss times its
            weight (docs/original-differences.md §6.5), which equals these when the preference weights sum to 1
            (0.8 + 0.2 in MPO).
        rejected_rewards: β·Δr, detached, [B].
        reward_accuracy: mean over this micro-batch of (chosen_rewards > rejected_rewards), scalar.
        reward_margin: mean over this micro-batch of (chosen_rewards − rejected_rewards), scalar.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor


@dataclass
class PreferenceObjective:
    """A weighted mix of preference losses (`preference.py`) and optionally an SFT term on the chosen response.

    Called once per micro-batch with the step's totals (`num_pairs_in_step`, `sft_weight_in_step`, over every
    micro-batch of the step and every rank), it returns the micro-batch's share of the step's loss, normalised as in
    the module docstring, so the loss of a step does not depend on how its pairs fall into micro-batches and ranks
    (multiply by the world size when DDP averages gradients over ranks). Without the totals the micro-batch is the
    whole step: a micro-batch mean, like the original.

    Attributes:
        loss_types: preference loss types from PREFERENCE_LOSS_TYPES, and optionally "sft".
        loss_weights: one non-negative weight per loss type.
        beta: β of every preference loss.
        label_smoothing: ls of `sigmoid`, `robust` and `exo_pair` (other types ignore it).
        sft_reduction: "token" (the original: Σ NLL / Σ tokens over the step's chosen responses), "sample" (mean
            over the step's pairs of each chosen response's per-token mean NLL, the paper's −log π(yc|x)/|yc|) or
            "square" (weights 1/√|yc|); the rule of SFT's `loss_reduction`, losses/reduction.py.
    """

    loss_types: list[str]
    loss_weights: list[float]
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_reduction: LossReduction = "token"

    def __post_init__(self) -> None:
        self.loss_types = list(self.loss_types)
        self.loss_weights = [float(w) for w in self.loss_weights]
        if not self.loss_types:
            raise ValueError("loss_type: at least one loss type is required")
        if len(self.loss_types) != len(self.loss_weights):
            raise ValueError(
                f"loss_weights: {len(self.loss_weights)} weights {self.loss_weights} for {len(self.loss_types)} "
                f"loss types {self.loss_types}; give one weight per type"
            )
        for loss_type in self.loss_types:
            if loss_type not in LOSS_TYPES:
                raise ValueError(f"loss_type: unknown type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
        duplicates = sorted({t for t in self.loss_types if self.loss_types.count(t) > 1})
        if duplicates:
            raise ValueError(f"loss_type: {duplicates} listed more than once in {self.loss_types}")
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if weight < 0:
                raise ValueError(f"loss_weights: weight of {loss_type!r} must be >= 0, got {weight}")
        if self.beta <= 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if self.label_smoothing < 0:
            raise ValueError(f"label_smoothing: must be >= 0, got {self.label_smoothing}")
        if self.sft_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"sft_reduction: must be one of {', '.join(LOSS_REDUCTIONS)}, got {self.sft_reduction!r}")
        if self.label_smoothing and not any(t in _USES_LABEL_SMOOTHING for t in self.loss_types):
            warnings.warn(
                f"label_smoothing={self.label_smoothing} is ignored: none of {self.loss_types} uses it "
                f"(only {', '.join(_USES_LABEL_SMOOTHING)} do)",
                stacklevel=2,
            )

    @classmethod
    def from_config(
        cls,
        loss_type: str | Sequence[str],
        loss_weights: Sequence[float] | None = None,
        rpo_alpha: float | None = None,
        sigmoid_loss_weight: float | None = None,
        bco_pair_loss_weight: float | None = None,
        *,
        beta: float = 0.1,
        label_smoothing: float = 0.0,
        sft_reduction: LossReduction = "token",
    ) -> PreferenceObjective:
        """Build from the settings of `MPOArgs`, the loss mix read by `resolve_loss_mix` (either spelling).

        Ours: `loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]`. The original's: `loss_type=
        "sigmoid,bco_pair", sigmoid_loss_weight=0.8, bco_pair_loss_weight=0.2, rpo_alpha=1.0`. Both give MPO.
        """
        types, weights = resolve_loss_mix(
            loss_type,
            loss_weights,
            rpo_alpha=rpo_alpha,
            sigmoid_loss_weight=sigmoid_loss_weight,
            bco_pair_loss_weight=bco_pair_loss_weight,
        )
        return cls(types, weights, beta=beta, label_smoothing=label_smoothing, sft_reduction=sft_reduction)

    @property
    def needs_delta(self) -> bool:
        """Whether `bco_pair` is in the mix, so the recipe must keep a `RunningRewardMean` and pass its δ."""
        return "bco_pair" in self.loss_types

    @property
    def sft_weight(self) -> float:
        """Weight of the SFT term, 0.0 when there is none."""
        if SFT_LOSS_TYPE not in self.loss_types:
            return 0.0
        return self.loss_weights[self.loss_types.index(SFT_LOSS_TYPE)]

    def rewards(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """β·Δc and β·Δr, detached, [B] each: `preference.rewards` with this objective's β, the rewards `__call__`
        reports; the recipe folds them into δ before calling the objective."""
        return rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, self.beta)

    def __call__(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
        *,
        chosen_num_tokens: torch.Tensor | None = None,
        rejected_num_tokens: torch.Tensor | None = None,
        delta: float | torch.Tensor | None = None,
        num_pairs_in_step: int | None = None,
        sft_weight_in_step: float | None = None,
    ) -> ObjectiveOutput:
        """This micro-batch's share of the step's objective.

        Args:
            policy_chosen_logps: log π(yc|x) summed over response tokens, [B]; −policy_chosen_logps is the chosen
                NLL of the SFT term.
            policy_rejected_logps: log π(yr|x), [B].
            ref_chosen_logps: log π0(yc|x), [B].
            ref_rejected_logps: log π0(yr|x), [B].
            chosen_num_tokens: response tokens of each chosen response, [B]; required with "sft" and "ipo".
            rejected_num_tokens: the same for the rejected responses, [B]; required with "ipo".
            delta: the BCO shift, `RunningRewardMean.update(...)` after folding in THIS micro-batch's
                `self.rewards(...)`; required when `needs_delta`.
            num_pairs_in_step: pairs in the whole step, all micro-batches and ranks (default: B, this micro-batch).
            sft_weight_in_step: the SFT term's denominator over the whole step, all micro-batches and ranks:
                `weight_total` (losses/reduction.py) of the chosen responses' token counts (token: their tokens;
                sample: their number; square: Σ √n). Default: this micro-batch's.
        """
        if self.needs_delta and delta is None:
            raise ValueError("bco_pair needs delta, the RunningRewardMean value after this micro-batch's update")
        if SFT_LOSS_TYPE in self.loss_types and chosen_num_tokens is None:
            raise ValueError("the 'sft' term needs chosen_num_tokens")
        num_pairs = policy_chosen_logps.shape[0] if num_pairs_in_step is None else num_pairs_in_step
        loss = policy_chosen_logps.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == SFT_LOSS_TYPE:
                term = self._sft_term(-policy_chosen_logps, chosen_num_tokens, sft_weight_in_step)
            else:
                term = (
                    preference_loss(
                        loss_type,
                        policy_chosen_logps,
                        policy_rejected_logps,
                        ref_chosen_logps,
                        ref_rejected_logps,
                        beta=self.beta,
                        delta=0.0 if delta is None else delta,
                        label_smoothing=self.label_smoothing,
                        chosen_lengths=chosen_num_tokens,
                        rejected_lengths=rejected_num_tokens,
                    ).sum()
                    / num_pairs
                )
            terms[loss_type] = term.detach()
            loss = loss + weight * term

        chosen_rewards, rejected_rewards = self.rewards(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
        )
        return ObjectiveOutput(
            loss=loss,
            terms=terms,
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            reward_accuracy=(chosen_rewards > rejected_rewards).float().mean(),
            reward_margin=(chosen_rewards - rejected_rewards).mean(),
        )

    def _sft_term(
        self, chosen_nll: torch.Tensor, chosen_num_tokens: torch.Tensor, sft_weight_in_step: float | None
    ) -> torch.Tensor:
        # Σ w(n)·NLL / Σ w(n)·n over the step; a response with no labelled token (cut) has weight 0, not 0/0 = nan.
        weights = token_weights(chosen_num_tokens.to(chosen_nll.device), self.sft_reduction, chosen_nll.dtype)
        if sft_weight_in_step is None:
            sft_weight_in_step = float((weights * chosen_num_tokens).sum())
        return (weights * chosen_nll).sum() / max(sft_weight_in_step, 1e-12)
