"""The model in training: loading (`load_model`), preparation, the training forward, log-probs, the reference,
freezing, LoRA and DropPath; model folders written from a model (`save_hf_checkpoint`, `export_checkpoint`)."""

from internvl_tune._lazy import lazy_exports

_EXPORTS = {
    "load_model": "load",
    "load_for_inference": "load",
    "save_hf_checkpoint": "save",
    "export_checkpoint": "save",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
