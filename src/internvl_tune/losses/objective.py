"""The MPO objective as data: a weighted mix of preference losses plus an SFT term on the chosen response
(docs/original-differences.md §6.1, §6.5).

MPO (https://arxiv.org/abs/2411.10442) is `PreferenceObjective(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])`:

    L = mean_pairs(0.8·L_sigmoid + 0.2·L_bco_pair) + 1.0·L_sft

with L_sft the chosen-response NLL, a token mean over the micro-batch as in the original (`sft_reduction="token"`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from internvl_tune.losses.preference import PREFERENCE_LOSS_TYPES, preference_loss, rewards

SFT_LOSS_TYPE = "sft"
LOSS_TYPES = (*PREFERENCE_LOSS_TYPES, SFT_LOSS_TYPE)

# The original has a weight field only for these two (docs/original-differences.md §6.5); other types cannot be
# weighted in its spelling.
_ORIGINAL_WEIGHT_FIELDS = ("sigmoid", "bco_pair")
_USES_LABEL_SMOOTHING = ("sigmoid", "robust", "exo_pair")


@dataclass
class ObjectiveOutput:
    """What one micro-batch's objective returns.

    Attributes:
        loss: scalar to backpropagate: mean over pairs of Σ_t w_t·loss_t, plus w_sft·sft_term.
        per_pair: Σ_t w_t·loss_t per pair without the SFT term, [B] (for recipes that normalise globally).
        terms: each term's UNWEIGHTED mean over the micro-batch, detached, keyed by loss type ("sigmoid",
            "bco_pair", "sft", ...), for logging.
        chosen_rewards: β·Δc, detached, [B]. Not weighted: the original sums the rewards of each sub-loss times its
            weight (docs/original-differences.md §6.5), which equals these when the preference weights sum to 1
            (0.8 + 0.2 in MPO).
        rejected_rewards: β·Δr, detached, [B].
        reward_accuracy: mean of (chosen_rewards > rejected_rewards), scalar.
        reward_margin: mean of (chosen_rewards − rejected_rewards), scalar.
    """

    loss: torch.Tensor
    per_pair: torch.Tensor
    terms: dict[str, torch.Tensor]
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor


@dataclass
class PreferenceObjective:
    """A weighted mix of preference losses (`preference.py`) and optionally an SFT term on the chosen response.

    Global normalisation: `loss` is a micro-batch mean, like the original. A recipe that wants the optimizer step's
    loss not to depend on how pairs fall into micro-batches and ranks backpropagates, per micro-batch,

        out.per_pair.sum() / num_pairs_in_step + objective.sft_weight * chosen_nll_sum.sum() / num_chosen_tokens_in_step

    where both totals run over every micro-batch of the step and every rank (multiply by the world size when DDP
    averages gradients over ranks). With `sft_reduction="sample"` the SFT part is instead
    `(chosen_nll_sum / chosen_num_tokens).sum() / num_pairs_in_step`.

    Attributes:
        loss_types: preference loss types from PREFERENCE_LOSS_TYPES, and optionally "sft".
        loss_weights: one non-negative weight per loss type.
        beta: β of every preference loss.
        label_smoothing: ls of `sigmoid`, `robust` and `exo_pair` (other types ignore it).
        sft_reduction: "token" (the original: Σ NLL / Σ tokens over the micro-batch's chosen responses) or
            "sample" (mean over pairs of each chosen response's per-token mean NLL, the paper's −log π(yc)/|yc|).
    """

    loss_types: list[str]
    loss_weights: list[float]
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_reduction: Literal["token", "sample"] = "token"

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
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.label_smoothing < 0:
            raise ValueError(f"label_smoothing must be >= 0, got {self.label_smoothing}")
        if self.sft_reduction not in ("token", "sample"):
            raise ValueError(f"sft_reduction must be 'token' or 'sample', got {self.sft_reduction!r}")
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
        sft_reduction: Literal["token", "sample"] = "token",
    ) -> PreferenceObjective:
        """Build from either spelling of the loss mix.

        Ours: `loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]` (a comma-separated string works
        too). The original's (docs/original-differences.md §6.5): `loss_type="sigmoid,bco_pair",
        sigmoid_loss_weight=0.8, bco_pair_loss_weight=0.2, rpo_alpha=1.0`, where rpo_alpha becomes the weight of an
        appended "sft" term. Both give the same objective. As in the original, `*_loss_weight` default to 1.0 in a
        combination and are ignored (with a warning) for a single loss type.
        """
        types = [t.strip() for t in loss_type.split(",")] if isinstance(loss_type, str) else list(loss_type)
        original_fields = {
            "rpo_alpha": rpo_alpha,
            "sigmoid_loss_weight": sigmoid_loss_weight,
            "bco_pair_loss_weight": bco_pair_loss_weight,
        }
        given_original = sorted(name for name, value in original_fields.items() if value is not None)
        settings = {"beta": beta, "label_smoothing": label_smoothing, "sft_reduction": sft_reduction}
        if loss_weights is not None:
            if given_original:
                raise ValueError(
                    f"loss_weights cannot be combined with {given_original} (the original spelling); "
                    "give every weight, 'sft' included, in loss_weights"
                )
            return cls(types, list(loss_weights), **settings)

        if SFT_LOSS_TYPE in types:
            raise ValueError(
                "loss_type: 'sft' needs loss_weights; in the original spelling the SFT weight is rpo_alpha"
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
                    f"(only {', '.join(_ORIGINAL_WEIGHT_FIELDS)}); give loss_weights instead"
                )
            per_type = {"sigmoid": sigmoid_loss_weight, "bco_pair": bco_pair_loss_weight}
            weights = [1.0 if per_type[t] is None else per_type[t] for t in types]
        if rpo_alpha is not None:
            types.append(SFT_LOSS_TYPE)
            weights.append(rpo_alpha)
        return cls(types, weights, **settings)

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

    def __call__(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: torch.Tensor,
        ref_rejected_logps: torch.Tensor,
        *,
        delta: float | torch.Tensor | None = None,
        chosen_nll_sum: torch.Tensor | None = None,
        chosen_num_tokens: torch.Tensor | None = None,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """The objective of one micro-batch.

        Args:
            policy_chosen_logps: log π(yc|x) summed over response tokens, [B].
            policy_rejected_logps: log π(yr|x), [B].
            ref_chosen_logps: log π0(yc|x), [B].
            ref_rejected_logps: log π0(yr|x), [B].
            delta: the BCO shift, `RunningRewardMean.update(...)` after folding in THIS micro-batch's rewards;
                required when `needs_delta`.
            chosen_nll_sum: per-pair summed NLL of the chosen response, [B]; required with "sft".
            chosen_num_tokens: per-pair number of chosen response tokens, [B]; required with "sft".
            chosen_lengths: per-pair number of chosen response tokens, [B]; required with "ipo".
            rejected_lengths: per-pair number of rejected response tokens, [B]; required with "ipo".
        """
        if self.needs_delta and delta is None:
            raise ValueError("bco_pair needs delta, the RunningRewardMean value after this micro-batch's update")
        per_pair = torch.zeros_like(policy_chosen_logps)
        terms: dict[str, torch.Tensor] = {}
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == SFT_LOSS_TYPE:
                continue
            losses = preference_loss(
                loss_type,
                policy_chosen_logps,
                policy_rejected_logps,
                ref_chosen_logps,
                ref_rejected_logps,
                beta=self.beta,
                delta=0.0 if delta is None else delta,
                label_smoothing=self.label_smoothing,
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
            )  # [B]
            terms[loss_type] = losses.detach().mean()
            per_pair = per_pair + weight * losses
        loss = per_pair.mean()
        if SFT_LOSS_TYPE in self.loss_types:
            if chosen_nll_sum is None or chosen_num_tokens is None:
                raise ValueError("the 'sft' term needs chosen_nll_sum and chosen_num_tokens")
            sft = self._sft_term(chosen_nll_sum, chosen_num_tokens)
            terms[SFT_LOSS_TYPE] = sft.detach()
            loss = loss + self.sft_weight * sft

        chosen_rewards, rejected_rewards = rewards(
            policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, self.beta
        )
        return ObjectiveOutput(
            loss=loss,
            per_pair=per_pair,
            terms=terms,
            chosen_rewards=chosen_rewards,
            rejected_rewards=rejected_rewards,
            reward_accuracy=(chosen_rewards > rejected_rewards).float().mean(),
            reward_margin=(chosen_rewards - rejected_rewards).mean(),
        )

    def _sft_term(self, chosen_nll_sum: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
        # clamp: a chosen response with no labelled token (cut by truncation) contributes 0, not 0/0 = nan.
        if self.sft_reduction == "token":
            return chosen_nll_sum.sum() / chosen_num_tokens.sum().clamp(min=1)
        return (chosen_nll_sum / chosen_num_tokens.clamp(min=1)).mean()
