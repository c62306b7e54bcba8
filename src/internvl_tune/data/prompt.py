"""Inference prompts: a conversation and its images -> token ids and tiles, rendered as training renders a sample.

Every command that generates (chat, evaluation, sampling) builds its prompt here, from the `SampleSettings` the
model was trained with (template, system message, tile size, image tokens per tile, min / max tiles, thumbnail,
normalisation), and the images go through `SampleBuilder.expand`, the very code that tiles training samples. So a
model is asked in the form it learned, and two commands never disagree about a prompt.

Worked example (`internvl2_5`, 56 px tiles, 4 image tokens per tile, max_dynamic_patch 2, thumbnail on): the
question "What colour?" about one 112x56 image becomes the user turn "<image>\\nWhat colour?" (`user_turn`, data/placeholders.py); the
image is a 2x1 grid plus its thumbnail, 3 tiles, so `<image>` becomes `<img>` + `<IMG_CONTEXT>` x 12 + `</img>`;
the text is the system segment, that user segment and the bare "<|im_start|>assistant\\n"; `pixel_values` is
`[3, 3, 56, 56]` and `num_tiles` is `[3]`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from internvl_tune.constants import IMAGE_PLACEHOLDER
from internvl_tune.data.errors import DataError
from internvl_tune.data.images import load_image
from internvl_tune.data.templates import build_generation_prompt
from internvl_tune.data.transform import Conversation, SampleBuilder, SampleSettings


@dataclass
class InferencePrompt:
    """One tokenized generation prompt and its tiles."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [N, 3, S, S]; None without images
    num_tiles: list[int]  # per image
    position_ids: torch.Tensor  # [T]: 0, 1, 2, ... (long), or V2PE's at the fixed stride (float32, data/v2pe.py)


def build_inference_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict[str, str]],
    images: Sequence[str | os.PathLike[str] | Image.Image],
    settings: SampleSettings,
    *,
    assistant_prefill: str = "",
) -> InferencePrompt:
    """Token ids and tiles of a conversation for the model to continue with its answer.

    The images are tiled as in a training record: they share the tile budget (`SampleBuilder.tile_limit`:
    `max_dynamic_patch // len(images)` each, at least 1), with `min_dynamic_patch`, `dynamic_image_size`,
    `use_thumbnail`, `normalize_type` and `pad2square` as set. Each `<image>` of the user turns is expanded to its
    tiles' tokens, and the text is tokenized at once without special tokens, with one BOS in front for tokenizers
    that add one: the segments `tokenize_conversation` tokenizes one by one are delimited by special tokens, so the
    ids equal the training sample's up to its answer.

    Args:
        tokenizer: the model's tokenizer (it must know `<IMG_CONTEXT>`).
        messages: the conversation, ending with a user turn; the k-th `<image>` of the user turns stands for
            `images[k]`.
        images: image files or images already loaded, in placeholder order.
        settings: the settings the model was trained with (`sample_settings` of a run's data arguments, or the
            settings a checkpoint records). A model trained with `v2pe: random` is asked with its fixed
            `v2pe_stride`, as V2PE evaluates.
        assistant_prefill: the start of the answer, for the model to continue (dropout next-token prediction). It
            follows the assistant role (and the answer header of templates with one, e.g. GPT-OSS
            `<|channel|>final<|message|>`) and is tokenized with the rest of the text, as training tokenizes the
            role and the answer of the assistant segment together.

    Raises:
        ValueError: the number of `<image>` placeholders in the user turns is not the number of images.
        DataError: an image file is missing or cannot be read (a ValueError too).
    """
    num_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "user")
    if num_placeholders != len(images):
        raise DataError(f"{num_placeholders} <image> placeholders in the conversation for {len(images)} images")
    loaded = [load_image(i) if isinstance(i, (str, os.PathLike)) else i.convert("RGB") for i in images]
    if settings.v2pe == "random":
        settings = replace(settings, v2pe="fixed")  # inference has no per-sample draw: the recorded stride
    builder = SampleBuilder(tokenizer, settings)
    media = builder.expand(Conversation(list(messages), loaded), "prompt", None, rng=None)
    text = build_generation_prompt(
        builder.template, media.messages, system_message=settings.system_message, assistant_prefill=assistant_prefill
    )
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        input_ids = [tokenizer.bos_token_id, *input_ids]
    position_ids = builder.position_ids(input_ids, builder.image_strides(len(media.num_tiles), None))
    return InferencePrompt(input_ids, media.pixel_values, media.num_tiles, position_ids)
