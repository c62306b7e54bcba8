"""The pipeline settings: how conversations and their images become model inputs, shared by training (the run
config's `data` section extends them), checkpoint metadata, chat and evaluation. Here, below the run config, so the
data package that reads them does not import the config that extends them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from internvl_tune.constants import DEFAULT_MAX_DYNAMIC_PATCH


@dataclass
class PipelineSettings:
    """How conversations and their images become model inputs: the `data` fields that training, checkpoint metadata,
    chat and evaluation share. `DataArgs` (config.py) adds the data files; `SampleSettings` (data/transform.py) adds the template
    and the model's tile geometry. Each default is written here once."""

    system_message: str | None = None
    """System message for conversations without a system turn (None = the template's own)."""
    thinking: bool = False
    """Thinking mode: the template's thinking system message replaces its default (internvl2_5: the InternVL3.5 MPO
    trainer's R1_SYSTEM_PROMPT; internvl3_5_gpt_oss: Reasoning: high), and internvl3_5_gpt_oss trains an answer's
    `<think>...</think>` in the analysis channel. ChatML answers keep their `<think>` text, trained as written."""
    max_seq_length: int = 8192
    """Longest sample in tokens, image tokens included; samples whose image tokens do not fit are errors."""
    dynamic_image_size: bool = True
    """Split images into up to max_dynamic_patch tiles by aspect ratio (False = one resized tile)."""
    use_thumbnail: bool = True
    """Append a whole-image thumbnail tile when an image has more than one tile."""
    min_dynamic_patch: int = 1
    """Fewest tiles per image."""
    max_dynamic_patch: int = DEFAULT_MAX_DYNAMIC_PATCH
    """Most tiles per image (split across the images of a multi-image record); a meta entry may override."""
    min_num_frame: int = 8
    """Fewest frames drawn from a video."""
    max_num_frame: int = 32
    """Most frames drawn from a video."""
    video_sample: str = "rand"
    """Frame sampling: rand (one random frame per segment), middle, or fpsX (e.g. fps1.0)."""
    normalize_type: Literal["imagenet", "clip", "siglip"] = "imagenet"
    """Pixel normalisation statistics."""
    pad2square: bool = False
    """Pad images to a square with the mean colour before tiling."""
    v2pe: Literal["off", "fixed", "random"] = "off"
    """Variable visual position encoding (V2PE, docs/v2pe.md): off (every token advances the position by 1), fixed (an
    image's tokens advance it by v2pe_stride / tokens per tile each), random (the stride drawn per image from 1, 2, 4,
    ..., tokens per tile). Chat and eval use the fixed v2pe_stride."""
    v2pe_stride: int | None = None
    """V2PE: positions one image tile spans, 1 to the model's image tokens per tile (256 for InternVL 2.5 / 3; equal
    to it = plain positions); required with v2pe fixed or random (random: the stride chat and eval use)."""
