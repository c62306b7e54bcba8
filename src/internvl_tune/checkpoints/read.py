"""Reading InternVL checkpoint folders (either layout) without running a folder's code: config, tokenizer, the
weights' dtype and fingerprint, and an original folder as transformers' model in memory.

An original-layout `config.json` names the folder's own Python files in `auto_map`; `AutoConfig` and
`AutoTokenizer` would import them (after a `[y/N]` prompt). Configs are therefore read as plain JSON into an
explicit class, and the tokenizer class is chosen from `tokenizer_config.json` with `trust_remote_code=False`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import (
    AutoTokenizer,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
)

from internvl_tune.atomic import atomic_write_text
from internvl_tune.checkpoints.convert import (
    ConversionError,
    check_complete,
    is_original_checkpoint,
    iter_original_as_hf,
    original_to_hf_config,
    read_json,
    weight_files,
)
from internvl_tune.checkpoints.metadata import checkpoint_settings, metadata_for, set_chat_template
from internvl_tune.constants import IMG_CONTEXT_TOKEN
from internvl_tune.digests import StampedDigests, file_stamp, hash_files, user_cache_dir
from internvl_tune.errors import UserError

logger = logging.getLogger(__name__)


def read_config_json(path: str | Path) -> dict:
    """A checkpoint folder's `config.json` as a dict; ValueError when the folder has none."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path}: not a checkpoint folder (no config.json); models are loaded from local folders")
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
        return original_to_hf_config(raw, tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN))
    if raw.get("model_type") != "internvl":
        raise UserError(
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
        raise UserError(f"dtype must be auto, {', '.join(SAVE_DTYPES)}; got {choice!r}")
    return SAVE_DTYPES[choice]


def load_original(
    path: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> tuple[InternVLForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load an original remote-code InternVL folder as `InternVLForConditionalGeneration`, running none of its code."""
    path = Path(path)
    original = read_json(path / "config.json")
    tokenizer = load_tokenizer(path)
    config = original_to_hf_config(original, tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN))
    state_dict = dict(iter_original_as_hf(path, original))
    check_complete(config, state_dict, path)
    model = InternVLForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, attn_implementation=attn_implementation
    )
    set_chat_template(tokenizer, metadata_for(config, checkpoint_settings(path)))
    return model, tokenizer


FINGERPRINT_VERSION = 1  # of the stamps kept in the user cache: a new one ignores the old


def weights_fingerprint(path: str | Path) -> str:
    """SHA-256 over a checkpoint's weight files (names and full contents), so any changed weight is noticed.

    The bytes are read only when the files' stamps (sizes, mtimes, ctimes and safetensors headers:
    `internvl_tune.digests`) differ from those recorded with this folder's last fingerprint in the user cache
    (`~/.cache/internvl_tune/fingerprints/`); otherwise the recorded fingerprint is returned after a stat and a
    header read per shard. So an MPO start, a `precompute-ref` and every LoRA save cost milliseconds instead of
    reading every weight (16 GB for an 8B model), and a rewritten shard is still hashed again. Hashing runs at about
    1-2 GB/s; a progress bar shows for checkpoints over 1 GB. An unwritable user cache only costs the next call a
    hash.
    """
    files = weight_files(Path(path))
    key = str(Path(path).resolve())
    record = user_cache_dir("fingerprints") / (
        f"v{FINGERPRINT_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    )
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = {}  # none yet, or unreadable: hash
    digests = StampedDigests(known)

    def hash_weights() -> str:
        total = sum(f.stat().st_size for f in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="fingerprint", disable=total < 1 << 30) as progress:
            return hash_files(files, names=True, progress=progress.update)[:32]

    fingerprint = digests(key, [[f.name, *file_stamp(f)] for f in files], hash_weights)
    if digests.stamps != known:
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(record, json.dumps(digests.stamps))
        except OSError as e:
            logger.debug("could not record the weights fingerprint of %s in %s: %s", key, record, e)
    return fingerprint
