"""The model in training: loading (`load_model`), preparation, the training forward, log-probs, the reference,
freezing, LoRA and DropPath."""

from internvl_tune._lazy import lazy_exports

_EXPORTS = {
    "load_model": "load",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
