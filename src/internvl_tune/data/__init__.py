"""Records -> samples -> batches: meta files, images and tiling (`dynamic_preprocess`), video, templates, the
transforms, datasets, sampling and collation."""

from internvl_tune._lazy import lazy_exports

_EXPORTS = {
    "dynamic_preprocess": "images",
    "load_image": "images",
    "ImageTransform": "images",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
