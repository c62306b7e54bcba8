"""`internvl_tune.json`: what a checkpoint carries besides its weights (template, system message, image settings,
package version, and for runs the resolved config), and the chat template written from it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import InternVLConfig, PreTrainedTokenizerBase

from internvl_tune import __version__
from internvl_tune.checkpoints.convert import is_original_checkpoint, read_json
from internvl_tune.data.images import image_geometry
from internvl_tune.data.templates import chat_template_jinja, get_template

METADATA_FILE = "internvl_tune.json"


def read_metadata(path: str | Path) -> dict:
    """The internvl-tune metadata of a checkpoint folder (template, image settings, run config), or {}."""
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def checkpoint_settings(path: str | Path) -> dict[str, Any]:
    """Template, system message and image settings of a checkpoint in either layout (metadata, else defaults)."""
    path = Path(path)
    if is_original_checkpoint(path):
        original = read_json(path / "config.json")
        return {
            "template": original.get("template") or "internvl2_5",
            "system_message": original.get("system_message"),
            "dynamic_image_size": original.get("dynamic_image_size", True),
            "use_thumbnail": original.get("use_thumbnail", True),
            "min_dynamic_patch": original.get("min_dynamic_patch", 1),
            "max_dynamic_patch": original.get("max_dynamic_patch", 12),
            "llm_family": original["llm_config"].get("model_type"),
        }
    metadata = read_metadata(path)
    image = metadata.get("image", {})
    return {
        "template": metadata.get("template", "internvl2_5"),
        "system_message": metadata.get("system_message"),
        "dynamic_image_size": image.get("dynamic_image_size", True),
        "use_thumbnail": image.get("use_thumbnail", True),
        "min_dynamic_patch": image.get("min_dynamic_patch", 1),
        "max_dynamic_patch": image.get("max_dynamic_patch", 12),
        "normalize_type": image.get("normalize_type", "imagenet"),
        "llm_family": metadata.get("llm_family"),
    }


def metadata_for(model_config: InternVLConfig, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The `internvl_tune.json` content for a checkpoint: template, system message, image settings, version."""
    template = get_template(settings.get("template") or "internvl2_5")
    geometry = image_geometry(model_config)
    return {
        "internvl_tune_version": __version__,
        "template": template.name,
        "system_message": settings.get("system_message") or template.system_message,
        "llm_family": settings.get("llm_family") or model_config.text_config.model_type,
        "image": {
            "image_size": geometry.image_size,
            "patch_size": geometry.patch_size,
            "num_image_token": geometry.num_image_token,
            "dynamic_image_size": settings.get("dynamic_image_size", True),
            "use_thumbnail": settings.get("use_thumbnail", True),
            "min_dynamic_patch": settings.get("min_dynamic_patch", 1),
            "max_dynamic_patch": settings.get("max_dynamic_patch", 12),
            "normalize_type": settings.get("normalize_type", "imagenet"),
        },
        **extra,
    }


def set_chat_template(tokenizer: PreTrainedTokenizerBase, metadata: dict[str, Any]) -> None:
    """The checkpoint's template (and system message) as the tokenizer's Jinja chat template."""
    template = get_template(metadata["template"])
    if metadata.get("system_message"):
        template = replace(template, system_message=metadata["system_message"])
    bos = tokenizer.bos_token if getattr(tokenizer, "add_bos_token", False) else None
    tokenizer.chat_template = chat_template_jinja(template, bos_token=bos)
