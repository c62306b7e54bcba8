"""Losses as pure functions of log-probs: preference losses (`preference_loss`), the MPO mix of them
(`PreferenceObjective`), and online RL's group advantages and GSPO / GRPO loss (`group_advantages`, `policy_loss`)."""

from internvl_tune._lazy import lazy_exports

_EXPORTS = {
    "preference_loss": "preference",
    "PreferenceObjective": "objective",
    "PREFERENCE_LOSS_TYPES": "preference",
    "group_advantages": "rl",
    "policy_loss": "rl",
    "loss_normalizer": "rl",
    "RLLoss": "rl",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
