"""`internvl_tune.json`: what a checkpoint carries besides its weights (template, system message, image settings,
V2PE mode and stride, package version, and for runs the resolved config), and the chat template written from it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import InternVLConfig, PreTrainedTokenizerBase

from internvl_tune import __version__
from internvl_tune.checkpoints.convert import is_original_checkpoint, read_json
from internvl_tune.config import PipelineSettings
from internvl_tune.constants import DEFAULT_TEMPLATE
from internvl_tune.data.images import image_geometry
from internvl_tune.data.templates import chat_template_jinja, get_template
from internvl_tune.data.transform import SampleSettings

METADATA_FILE = "internvl_tune.json"

# The pipeline settings a checkpoint records under "image", beside the model's tile geometry: what its prompts need
# to be tiled and normalised as in training.
IMAGE_SETTINGS = (
    "dynamic_image_size",
    "use_thumbnail",
    "min_dynamic_patch",
    "max_dynamic_patch",
    "normalize_type",
    "pad2square",
)
# Those an original-layout config.json holds for inference (its pad2square is a training flag, unused by `chat()`).
_ORIGINAL_IMAGE_SETTINGS = ("dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch")


def read_metadata(path: str | Path) -> dict:
    """The internvl-tune metadata of a checkpoint folder (template, image settings, run config), or {}."""
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


# The template of an HF folder that records none (OpenGVLab's own `-HF` folders, transformers' conversions): the one
# the original trains that LLM family with, read from the folder's config (never from its name).
_FAMILY_TEMPLATES = {"gpt_oss": "internvl3_5_gpt_oss"}


def _family_template(path: Path) -> str:
    config_file = path / "config.json"
    text = json.loads(config_file.read_text()).get("text_config", {}) if config_file.is_file() else {}
    return _FAMILY_TEMPLATES.get(text.get("model_type"), DEFAULT_TEMPLATE)


def checkpoint_settings(path: str | Path) -> dict[str, Any]:
    """Template, system message, thinking mode, image settings (`IMAGE_SETTINGS`), V2PE (`v2pe`, `v2pe_stride`) and LLM
    family of a checkpoint in either layout: what its metadata (or original config) records, else the defaults of
    `PipelineSettings` (V2PE: what a folder we wrote records, in either layout, else off). The template is the one recorded
    (`internvl_tune.json`, or the original config's `template`), never guessed from the folder's or the model's
    name."""
    path = Path(path)
    defaults = PipelineSettings()
    settings: dict[str, Any] = {name: getattr(defaults, name) for name in (*IMAGE_SETTINGS, "v2pe", "v2pe_stride")}
    metadata = read_metadata(path)
    if "v2pe" in metadata:
        settings.update(v2pe=metadata["v2pe"]["mode"], v2pe_stride=metadata["v2pe"]["stride"])
    if is_original_checkpoint(path):
        original = read_json(path / "config.json")
        settings.update({name: original[name] for name in _ORIGINAL_IMAGE_SETTINGS if name in original})
        return {
            "template": original.get("template") or DEFAULT_TEMPLATE,
            "system_message": original.get("system_message"),
            # The original has no such switch (its thinking prompt is its system_message); a folder we wrote says.
            "thinking": metadata.get("thinking", False),
            **settings,
            "llm_family": original["llm_config"].get("model_type"),
        }
    settings.update({name: value for name, value in metadata.get("image", {}).items() if name in IMAGE_SETTINGS})
    return {
        "template": metadata.get("template") or _family_template(path),
        "system_message": metadata.get("system_message"),
        "thinking": metadata.get("thinking", False),
        **settings,
        "llm_family": metadata.get("llm_family"),
    }


def checkpoint_sample_settings(path: str | Path, model_config: InternVLConfig) -> SampleSettings:
    """The settings a checkpoint was trained with, for its prompts (chat, evaluation): template, system message,
    image settings and V2PE from `checkpoint_settings` (prompts use its fixed stride, `build_inference_prompt`), tile
    size and image tokens from the model config; the rest (text length, video frames) at their defaults."""
    settings = checkpoint_settings(path)
    geometry = image_geometry(model_config)
    return SampleSettings(
        template=settings["template"],
        system_message=settings["system_message"],
        thinking=settings["thinking"],
        image_size=geometry.image_size,
        num_image_token=geometry.num_image_token,
        v2pe=settings["v2pe"],
        v2pe_stride=settings["v2pe_stride"],
        **{name: settings[name] for name in IMAGE_SETTINGS},
    )


def metadata_for(model_config: InternVLConfig, settings: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The `internvl_tune.json` content for a checkpoint: template, system message (resolved: the template's, or its
    thinking one, when the settings give none), thinking mode, image settings, V2PE, version.

    `settings`: a `checkpoint_settings` dict, or a run's `SampleSettings` as a dict (plus `llm_family`); a missing
    image or V2PE setting is recorded with its `PipelineSettings` default. V2PE is `{"mode": off | fixed | random,
    "stride": S}`: the stride chat and evaluation use (docs/v2pe.md).
    """
    thinking = bool(settings.get("thinking"))
    template = get_template(settings.get("template") or DEFAULT_TEMPLATE, thinking=thinking)
    geometry = image_geometry(model_config)
    defaults = PipelineSettings()
    return {
        "internvl_tune_version": __version__,
        "template": template.name,
        "system_message": settings.get("system_message") or template.system_message,
        "thinking": thinking,
        "llm_family": settings.get("llm_family") or model_config.text_config.model_type,
        "image": {
            "image_size": geometry.image_size,
            "patch_size": geometry.patch_size,
            "num_image_token": geometry.num_image_token,
            **{name: settings.get(name, getattr(defaults, name)) for name in IMAGE_SETTINGS},
        },
        "v2pe": {
            "mode": settings.get("v2pe", defaults.v2pe),
            "stride": settings.get("v2pe_stride", defaults.v2pe_stride),
        },
        **extra,
    }


def set_chat_template(tokenizer: PreTrainedTokenizerBase, metadata: dict[str, Any]) -> None:
    """The checkpoint's template (and system message) as the tokenizer's Jinja chat template."""
    template = get_template(metadata["template"], thinking=metadata.get("thinking", False))
    if metadata.get("system_message"):
        template = replace(template, system_message=metadata["system_message"])
    bos = tokenizer.bos_token if getattr(tokenizer, "add_bos_token", False) else None
    tokenizer.chat_template = chat_template_jinja(template, bos_token=bos)
