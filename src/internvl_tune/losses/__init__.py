"""Losses as pure functions of summed log-probs (`preference_loss`), and the MPO mix of them (`PreferenceObjective`)."""

from internvl_tune._lazy import lazy_exports

_EXPORTS = {
    "preference_loss": "preference",
    "PreferenceObjective": "objective",
    "PREFERENCE_LOSS_TYPES": "preference",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
