"""Writing whole checkpoints: HF folders from a model (`save_hf_checkpoint`), `internvl-tune convert` in both
directions and `internvl-tune export` (LoRA adapters merged).

- original -> hf streams: each original shard is read, converted and written before the next is read, so the
  process holds one shard (all shards only when unmerged LoRA weights must be merged first).
- hf -> original reads the HF weights once (q, k and v of a layer may sit in different shards) and writes
  original shards as they fill: one copy of the model plus one shard.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import InternVLConfig, PreTrainedTokenizerBase

from internvl_tune.atomic import TMP_MARK, atomic_dir
from internvl_tune.checkpoints.convert import (
    DEFAULT_MAX_SHARD_BYTES,
    ConversionError,
    check_complete,
    copy_tokenizer_files,
    hf_disk_name,
    hf_module_name,
    hf_to_original_config,
    hf_to_original_tensors,
    is_original_checkpoint,
    iter_original_as_hf,
    original_lora_ranks,
    original_to_hf_config,
    read_json,
    read_shard,
    weight_files,
    write_shards,
)
from internvl_tune.checkpoints.metadata import (
    METADATA_FILE,
    checkpoint_settings,
    metadata_for,
    read_metadata,
    set_chat_template,
)
from internvl_tune.checkpoints.read import (
    checkpoint_dtype,
    load_tokenizer,
    read_config_json,
    resolve_dtype,
    weights_fingerprint,
)
from internvl_tune.config import PipelineSettings
from internvl_tune.constants import IMG_CONTEXT_TOKEN, NORMALIZATION
from internvl_tune.model.forward import base_model
from internvl_tune.model.load import load_model
from internvl_tune.model.lora import load_adapter, merged_state_dict

logger = logging.getLogger(__name__)

EXTRA_WEIGHTS_FILE = "trained_non_lora.safetensors"  # trained non-LoRA weights next to LoRA adapters


def write_processor_files(path: Path, metadata: dict[str, Any]) -> None:
    """Image-processor and processor configs so that `AutoProcessor.from_pretrained(path)` builds transformers'
    InternVLProcessor (which itself needs torchvision installed)."""
    image = metadata["image"]
    mean, std = NORMALIZATION[image.get("normalize_type", PipelineSettings().normalize_type)]
    preprocessor = {
        "image_processor_type": "GotOcr2ImageProcessor",
        "processor_class": "InternVLProcessor",
        "crop_to_patches": bool(image["dynamic_image_size"]),
        "min_patches": image["min_dynamic_patch"],
        "max_patches": image["max_dynamic_patch"],
        "size": {"height": image["image_size"], "width": image["image_size"]},
        "do_resize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    processor = {"processor_class": "InternVLProcessor", "image_seq_length": image["num_image_token"]}
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2))


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


def check_output_dir(src: str | Path, dst: str | Path) -> Path:
    """`dst` as the output folder of a conversion or export of `src`: an existing folder there is replaced once
    the new one is complete, so it must be a model folder (never, say, a home directory) and not `src` itself."""
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ConversionError(f"{dst}: the output folder must differ from the input folder")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "config.json").is_file():
        raise ConversionError(f"{dst}: exists and is not a model folder; refusing to replace it")
    return dst


BASE_RECORD = "base_model"  # in an adapter folder's internvl_tune.json: {"path": absolute, "fingerprint": ...}


def base_model_record(path: str | Path) -> dict[str, str]:
    """What an adapter folder records of its base model: the absolute path and a fingerprint of its weights."""
    return {"path": str(Path(path).resolve()), "fingerprint": weights_fingerprint(path)}


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
        raise ValueError(f"--to must be hf or original, got {to!r}")
    if (src / "adapter_config.json").is_file():
        if not merge_lora_adapters:
            raise ValueError(f"{src} holds LoRA adapters only: pass --merge-lora (and --base if the base moved)")
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


def _cast(tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype | None):
    """The floating tensors in `dtype` (None: unchanged), one at a time."""
    for name, tensor in tensors:
        yield name, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def _written_dtype(src: Path, dtype: str) -> torch.dtype | None:
    """The cast a conversion applies: None for auto, which copies every tensor as it is (bit for bit)."""
    return None if dtype == "auto" else resolve_dtype(dtype, src)


def convert_to_hf(
    src: str | Path, dst: str | Path, *, dtype: str = "auto", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """Original layout -> transformers' layout (the released `*-hf` checkpoints' names), streaming shards.

    `dtype`: auto keeps every tensor's dtype; bf16, fp16 or fp32 cast the floating weights.
    """
    src, dst = Path(src), check_output_dir(src, dst)
    if not is_original_checkpoint(src):
        raise ConversionError(f"{src}: not an original InternVL checkpoint (architectures != InternVLChatModel)")
    original = read_json(src / "config.json")
    tokenizer = load_tokenizer(src)
    config = original_to_hf_config(original, tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN))
    cast = _written_dtype(src, dtype)
    config.dtype = cast or checkpoint_dtype(src)
    names: list[str] = []

    def disk_tensors():
        for name, tensor in _cast(iter_original_as_hf(src, original), cast):
            names.append(name)
            yield hf_disk_name(name), tensor

    with atomic_dir(dst) as tmp:
        write_shards(disk_tensors(), tmp, max_shard_bytes)
        check_complete(config, names, src)
        config.save_pretrained(tmp)
        metadata = metadata_for(config, checkpoint_settings(src), converted_from="original")
        set_chat_template(tokenizer, metadata)
        tokenizer.save_pretrained(tmp)
        write_processor_files(tmp, metadata)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    return dst


def convert_to_original(
    src: str | Path, dst: str | Path, *, dtype: str = "auto", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> Path:
    """transformers' layout -> original remote-code layout (config keys, fused qkv, InternLM2 names when the
    checkpoint came from an InternLM2 model). The original's modeling `.py` files are not ours to ship: copy them
    from the original model repository next to the weights to load with trust_remote_code.

    `dtype`: auto keeps every tensor's dtype; bf16, fp16 or fp32 cast the floating weights.
    """
    src, dst = Path(src), check_output_dir(src, dst)
    if is_original_checkpoint(src) or read_config_json(src).get("model_type") != "internvl":
        raise ConversionError(f"{src}: not an HF-native InternVL checkpoint (model_type internvl)")
    config = InternVLConfig.from_pretrained(src, local_files_only=True)
    settings = checkpoint_settings(src)
    original = hf_to_original_config(config, settings)
    cast = _written_dtype(src, dtype)
    original["torch_dtype"] = str(cast or checkpoint_dtype(src)).removeprefix("torch.")
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(src):
        tensors.update({hf_module_name(k): v for k, v in read_shard(file).items()})
    check_complete(config, tensors, src)
    with atomic_dir(dst) as tmp:
        write_shards(_cast(hf_to_original_tensors(tensors, original["llm_config"]), cast), tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(original, indent=2, ensure_ascii=False))
        copy_tokenizer_files(src, tmp)
        metadata = metadata_for(config, settings, converted_from="hf")
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    return dst
