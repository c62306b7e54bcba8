"""Loading HF-native InternVL checkpoints and reading the image geometry from their config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerBase

from internvl_tune.constants import IMG_CONTEXT_TOKEN, INTERNVL_SPECIAL_TOKENS

METADATA_FILE = "internvl_tune.json"


@dataclass(frozen=True)
class ImageGeometry:
    """Tile size and image tokens per tile, derived from the model config (never hard-coded)."""

    image_size: int
    patch_size: int
    downsample_ratio: float

    @property
    def num_image_token(self) -> int:
        """`int((image_size // patch_size)^2 * downsample_ratio^2)`: 256 for 448 px, patch 14, ratio 0.5."""
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)


def image_geometry(config: InternVLConfig) -> ImageGeometry:
    vision = config.vision_config
    image_size, patch_size = vision.image_size, vision.patch_size
    if image_size[0] != image_size[1] or patch_size[0] != patch_size[1]:
        raise ValueError(f"only square tiles are supported, got image_size={image_size}, patch_size={patch_size}")
    return ImageGeometry(int(image_size[0]), int(patch_size[0]), float(config.downsample_ratio))


def read_metadata(path: str | Path) -> dict:
    """The internvl-tune metadata of a checkpoint folder (template, image settings, run config), or {}."""
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load an InternVL checkpoint folder in either layout as `InternVLForConditionalGeneration` + tokenizer.

    HF-native folders load directly; original remote-code folders (`InternVLChatModel`) are converted in memory
    without running their code (`internvl-tune convert` does it once on disk). Nothing is downloaded.

    Raises:
        ValueError: the folder is missing, is not an InternVL checkpoint, or its tokenizer lacks the InternVL
            special tokens.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: not a checkpoint folder (no config.json); models are loaded from local folders")
    raw = json.loads(config_file.read_text())
    if "InternVLChatModel" in (raw.get("architectures") or []):
        from internvl_tune.model.checkpoint_io import load_original  # converts in memory; runs no remote code

        return load_original(path, dtype=dtype, attn_implementation=attn_implementation)
    if raw.get("model_type") != "internvl":
        raise ValueError(f"{config_file}: model_type is {raw.get('model_type')!r}, expected an InternVL checkpoint")
    model = InternVLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    missing = [t for t in INTERNVL_SPECIAL_TOKENS[:3] if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"{path}: the tokenizer lacks the InternVL tokens {missing}")
    if tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) != model.config.image_token_id:
        raise ValueError(
            f"{path}: config.image_token_id={model.config.image_token_id} but the tokenizer maps {IMG_CONTEXT_TOKEN} "
            f"to {tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)}"
        )
    return model, tokenizer
