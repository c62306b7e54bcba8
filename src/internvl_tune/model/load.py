"""Loading InternVL checkpoints (either layout), their tokenizer and config, without running a folder's code.

An original-layout `config.json` names the folder's own Python files in `auto_map`; `AutoConfig` and
`AutoTokenizer` would import them (after a `[y/N]` prompt). Configs are therefore read as plain JSON into an
explicit class, and the tokenizer class is chosen from `tokenizer_config.json` with `trust_remote_code=False`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
)

from internvl_tune.constants import IMG_CONTEXT_TOKEN, INTERNVL_SPECIAL_TOKENS
from internvl_tune.model.attention import resolve_attn_implementation
from internvl_tune.model.convert import ConversionError, is_original_checkpoint, original_to_hf_config, weight_files

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


def read_config_json(path: str | Path) -> dict:
    """A checkpoint folder's `config.json` as a dict; ValueError when the folder has none."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: not a checkpoint folder (no config.json); models are loaded from local folders")
    return json.loads(config_file.read_text())


def load_tokenizer(path: str | Path, config: PreTrainedConfig | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint folder in either layout, running none of the folder's code.

    `AutoTokenizer` reads `config.json` to pick a class unless given a config: it gets `config` (the model's
    HF config) or a blank one, so an original folder's `auto_map` is never seen, and `trust_remote_code=False`
    keeps a `tokenizer_config.json` `auto_map` from being followed.
    """
    try:
        return AutoTokenizer.from_pretrained(
            path, config=config or PreTrainedConfig(), trust_remote_code=False, local_files_only=True
        )
    except Exception as e:  # remote-code tokenizers (InternLM2's) cannot load without running their code
        raise ConversionError(
            f"{path}: the tokenizer could not be loaded without remote code ({type(e).__name__}: {e}). Save it once "
            "as a fast tokenizer (tokenizer.json) in that folder, e.g. with transformers' convert_slow_tokenizer."
        ) from e


def read_model_config(path: str | Path) -> InternVLConfig:
    """The transformers `InternVLConfig` of a checkpoint folder in either layout, read from plain JSON.

    For an original folder this is the config its in-memory conversion gets (the image token id comes from its
    tokenizer).
    """
    path = Path(path)
    raw = read_config_json(path)
    if is_original_checkpoint(path):
        tokenizer = load_tokenizer(path)
        return original_to_hf_config(raw, tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN))[0]
    if raw.get("model_type") != "internvl":
        raise ValueError(
            f"{path / 'config.json'}: model_type is {raw.get('model_type')!r}, expected an InternVL checkpoint"
        )
    return InternVLConfig.from_pretrained(path, local_files_only=True)


SAVE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: the floating dtype of most weight elements in its
    safetensors headers (no tensor is read), else `config.json`'s `dtype` / `torch_dtype`, else float32."""
    path = Path(path)
    elements: dict[torch.dtype, int] = {}
    files = weight_files(path)
    for file in files:
        if file.suffix != ".safetensors":
            break
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = f.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(tensor.get_dtype())
                if dtype is not None:
                    elements[dtype] = elements.get(dtype, 0) + math.prod(tensor.get_shape())
    if elements:
        return max(elements, key=elements.get)
    raw = read_config_json(path)
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def resolve_dtype(choice: str, source: str | Path) -> torch.dtype:
    """`auto` (the dtype of `source`'s weights), `bf16`, `fp16` or `fp32` as a torch dtype."""
    if choice == "auto":
        return checkpoint_dtype(source)
    if choice not in SAVE_DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(SAVE_DTYPES)}; got {choice!r}")
    return SAVE_DTYPES[choice]


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load an InternVL checkpoint folder in either layout as `InternVLForConditionalGeneration` + tokenizer.

    HF-native folders load directly; original remote-code folders (`InternVLChatModel`) are converted in memory
    without running their code (`internvl-tune convert` does it once on disk). Nothing is downloaded.

    `attn_implementation="auto"` is flex attention for the LLM on CUDA and SDPA elsewhere (model/attention.py).

    Raises:
        ValueError: the folder is missing, is not an InternVL checkpoint, or its tokenizer lacks the InternVL
            special tokens.
    """
    path = Path(path)
    attn_implementation = resolve_attn_implementation(
        attn_implementation, "cuda" if torch.cuda.is_available() else "cpu"
    )
    if is_original_checkpoint(path):
        from internvl_tune.model.checkpoint_io import load_original  # converts in memory; runs no remote code

        model, tokenizer = load_original(path, dtype=dtype, attn_implementation=attn_implementation)
    else:
        config = read_model_config(path)
        model = InternVLForConditionalGeneration.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        )
        tokenizer = load_tokenizer(path, config)
    # Absolute, so that LoRA adapters (PEFT records this as their base) find the base from any directory.
    model.name_or_path = model.config.name_or_path = str(path.resolve())
    missing = [t for t in INTERNVL_SPECIAL_TOKENS[:3] if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"{path}: the tokenizer lacks the InternVL tokens {missing}")
    if tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) != model.config.image_token_id:
        raise ValueError(
            f"{path}: config.image_token_id={model.config.image_token_id} but the tokenizer maps {IMG_CONTEXT_TOKEN} "
            f"to {tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)}"
        )
    return model, tokenizer
