"""Model folders from a model in memory: `save_hf_checkpoint` (training's `final/`, and every export) and
`export_checkpoint` (`internvl-tune export`: a model folder in either layout, LoRA adapters merged). The formats on
disk are checkpoints/'s; this is where a loaded model meets them.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from internvl_tune.atomic import TMP_MARK, atomic_dir
from internvl_tune.checkpoints.convert import (
    DEFAULT_MAX_SHARD_BYTES,
    ConversionError,
    is_original_checkpoint,
    original_lora_ranks,
    read_json,
)
from internvl_tune.checkpoints.metadata import (
    METADATA_FILE,
    checkpoint_settings,
    metadata_for,
    read_metadata,
    set_chat_template,
)
from internvl_tune.checkpoints.read import load_tokenizer, resolve_dtype, weights_fingerprint
from internvl_tune.checkpoints.write import (
    BASE_RECORD,
    EXTRA_WEIGHTS_FILE,
    check_output_dir,
    convert_to_original,
    write_processor_files,
)
from internvl_tune.errors import UserError
from internvl_tune.model.forward import base_model
from internvl_tune.model.load import load_model
from internvl_tune.model.lora import load_adapter, merged_state_dict

logger = logging.getLogger(__name__)


def save_hf_checkpoint(
    model,
    tokenizer: PreTrainedTokenizerBase,
    dst: str | Path,
    metadata: dict[str, Any],
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a full HF-layout folder: weights (LoRA merged), config, tokenizer with the template as its chat
    template, processor configs and `internvl_tune.json`. Plain transformers loads it. The folder appears under
    its name only when complete (an existing one is replaced then).

    `state_dict` is the model's full (gathered) state; by default the model's own, which is only complete when
    the model is not sharded. `dtype` is the dtype the floating weights are written in (None: as they are).
    """
    dst = Path(dst)
    state_dict = merged_state_dict(model, state_dict if state_dict is not None else model.state_dict())
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    config = copy.deepcopy(base_model(model).config)
    config.dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), torch.float32)
    with atomic_dir(dst) as tmp:
        base_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        config.save_pretrained(tmp)  # the dtype written, not the dtype the model was trained in
        set_chat_template(tokenizer, metadata)
        tokenizer.save_pretrained(tmp)
        write_processor_files(tmp, metadata)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    return dst


def adapter_base(adapter: Path, base: str | Path | None) -> Path:
    """The base model folder of a LoRA adapter folder: `base` when given, else the one training recorded.

    The recorded base must exist and hold the weights it held in training (same fingerprint), else the merge
    would silently produce another model: that is an error. An explicit `base` is the user's choice: a changed
    fingerprint is only a warning then (e.g. the base was re-saved in another dtype).
    """
    record = read_metadata(adapter).get(BASE_RECORD, {})
    if base is None:
        recorded = record.get("path") or read_json(adapter / "adapter_config.json").get("base_model_name_or_path")
        if not recorded or recorded == "None":
            raise ConversionError(f"{adapter}: the adapter does not record its base model; pass --base BASE_FOLDER")
        path = Path(recorded)
        if not (path / "config.json").is_file():
            where = "" if path.is_absolute() else " (a relative path, from the directory training ran in)"
            raise ConversionError(
                f"{adapter}: its base model {recorded}{where} is not a model folder (moved or deleted?); "
                "pass --base BASE_FOLDER"
            )
    else:
        path = Path(base)
        if not (path / "config.json").is_file():
            raise ConversionError(f"--base {base}: not a model folder (no config.json)")
    if record.get("fingerprint") and record["fingerprint"] != weights_fingerprint(path):
        message = f"{adapter}: the weights of its base model {path} changed since training (fingerprint differs)"
        if base is None:
            raise ConversionError(f"{message}; pass --base {path} to merge into them anyway")
        logger.warning("%s; merging into --base %s as asked", message, base)
    return path


def export_checkpoint(
    src: str | Path,
    dst: str | Path,
    *,
    to: str = "hf",
    merge_lora_adapters: bool = False,
    base: str | None = None,
    dtype: str = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """A full model folder in either layout from a model folder (either layout, original unmerged LoRA included)
    or, with `merge_lora_adapters`, from a LoRA adapter folder written by training (`final_adapter/`).

    `dtype`: auto (the dtype of the source's, or the adapter's base's, weights), bf16, fp16 or fp32.
    """
    src, dst = Path(src), check_output_dir(src, dst)
    if to not in ("hf", "original"):
        raise UserError(f"--to must be hf or original, got {to!r}")
    if (src / "adapter_config.json").is_file():
        if not merge_lora_adapters:
            raise ConversionError(f"{src} holds LoRA adapters only: pass --merge-lora (and --base if the base moved)")
        from safetensors.torch import load_file

        base_dir = adapter_base(src, base)
        save_dtype = resolve_dtype(dtype, base_dir)
        model, _ = load_model(base_dir)
        model = load_adapter(model, src)
        if (src / EXTRA_WEIGHTS_FILE).is_file():
            incompatible = model.load_state_dict(load_file(src / EXTRA_WEIGHTS_FILE), strict=False)
            if incompatible.unexpected_keys:
                raise ConversionError(f"{src / EXTRA_WEIGHTS_FILE}: unknown weights {incompatible.unexpected_keys[:5]}")
        tokenizer = load_tokenizer(src)
        metadata = read_metadata(src) or metadata_for(model.config, checkpoint_settings(base_dir))
    else:
        if merge_lora_adapters and not (
            is_original_checkpoint(src) and any(original_lora_ranks(read_json(src / "config.json")))
        ):
            logger.warning(
                "%s holds no LoRA adapters (no adapter_config.json, no unmerged LoRA weights): nothing was merged, the "
                "model is exported as it is (a LoRA run's adapters are in its final_adapter/)",
                src,
            )
        save_dtype = resolve_dtype(dtype, src)
        model, tokenizer = load_model(src)
        metadata = metadata_for(model.config, checkpoint_settings(src))
    if to == "hf":
        return save_hf_checkpoint(model, tokenizer, dst, metadata, dtype=save_dtype)
    dst.parent.mkdir(parents=True, exist_ok=True)
    # The HF intermediate is named like atomic_dir's temporaries, so a crash leaves nothing that looks whole.
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.name}.hf{TMP_MARK}") as tmp:
        save_hf_checkpoint(model, tokenizer, Path(tmp) / "model", metadata, dtype=save_dtype)
        del model
        return convert_to_original(Path(tmp) / "model", dst, max_shard_bytes=max_shard_bytes)
