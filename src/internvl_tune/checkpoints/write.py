"""Writing checkpoints from checkpoints: `internvl-tune convert` in both directions, and what the writers of model
folders (model/save.py: training's `final/`, `internvl-tune export`) share with it (the output folder check, the
processor files, the adapter's record of its base).

- original -> hf streams: each original shard is read, converted and written before the next is read, so the
  process holds one shard (all shards only when unmerged LoRA weights must be merged first).
- hf -> original reads the HF weights once (q, k and v of a layer may sit in different shards) and writes
  original shards as they fill: one copy of the model plus one shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import InternVLConfig

from internvl_tune.atomic import atomic_dir
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
    original_to_hf_config,
    read_json,
    read_shard,
    refuse_quantized,
    unfuse_qwen3_moe_experts,
    weight_files,
    write_shards,
)
from internvl_tune.checkpoints.metadata import (
    METADATA_FILE,
    checkpoint_settings,
    metadata_for,
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
    refuse_quantized(config, src)
    settings = checkpoint_settings(src)
    original = hf_to_original_config(config, settings)
    cast = _written_dtype(src, dtype)
    original["torch_dtype"] = str(cast or checkpoint_dtype(src)).removeprefix("torch.")
    tensors: dict[str, torch.Tensor] = {}
    moe = config.text_config.model_type == "qwen3_moe"
    for file in weight_files(src):
        for name, tensor in read_shard(file).items():
            name = hf_module_name(name)
            if config.tie_word_embeddings and name == "lm_head.weight":
                continue  # tied: transformers never reads a stored head
            tensors.update(unfuse_qwen3_moe_experts(name, tensor) if moe else [(name, tensor)])
    check_complete(config, tensors, src)
    with atomic_dir(dst) as tmp:
        write_shards(_cast(hf_to_original_tensors(tensors, original["llm_config"]), cast), tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(original, indent=2, ensure_ascii=False))
        copy_tokenizer_files(src, tmp)
        metadata = metadata_for(config, settings, converted_from="hf")
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    return dst
