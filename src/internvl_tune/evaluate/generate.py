"""Greedy answers from an InternVL model to image questions, with the prompt rendered exactly as in training.

An item `{"image": "a.png", "question": "What colour is the shape?"}` becomes the user turn
`"<image>\\nWhat colour is the shape?"`, rendered by the conversation template with the bare assistant role at
the end (`build_generation_prompt`); `<image>` is then expanded to `<img>` + `<IMG_CONTEXT>` x (tokens per tile x
tiles) + `</img>`, as `data/transform.py` does for training. So with 4 image tokens per tile and a 2x1 grid plus
thumbnail (3 tiles), the prompt holds 12 `<IMG_CONTEXT>` tokens and `pixel_values` is `[3, 3, S, S]`.

Prompts of a batch are padded on the LEFT, with an explicit attention mask, so that every row's last prompt token
sits at the same position and the new tokens follow it directly; `generate` derives position ids from the mask, so a
batched answer equals the one-at-a-time answer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from internvl_tune.constants import IMAGE_PLACEHOLDER
from internvl_tune.data.images import ImageTransform, dynamic_preprocess, load_image
from internvl_tune.data.templates import Template, build_generation_prompt, get_template, stop_token_ids
from internvl_tune.data.transform import image_token_span


@dataclass
class Prompt:
    """One tokenized generation prompt and its tiles."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [N, 3, S, S], or None for a text-only question


def build_prompt(
    tokenizer: PreTrainedTokenizerBase,
    template: Template,
    item: dict[str, Any],
    *,
    system_message: str | None,
    image_size: int,
    num_image_token: int,
    max_dynamic_patch: int,
    use_thumbnail: bool,
    transform: ImageTransform,
) -> Prompt:
    """Render, expand and tokenize one question the way `SampleBuilder` renders its training sample.

    Tokenization mirrors `tokenize_conversation`: no special tokens added, except one BOS in front for tokenizers
    that add one (the segments it tokenizes separately are delimited by special tokens, so tokenizing the whole
    prompt at once gives the same ids).
    """
    image = item.get("image")
    question = item["question"]
    pixel_values = None
    if image is not None:
        image = load_image(image) if isinstance(image, (str, os.PathLike)) else image.convert("RGB")
        tiles = dynamic_preprocess(image, 1, max_dynamic_patch, image_size, use_thumbnail)
        pixel_values = torch.stack([transform(tile) for tile in tiles])  # [N, 3, S, S]
        question = IMAGE_PLACEHOLDER + "\n" + question
    text = build_generation_prompt(template, [{"role": "user", "content": question}], system_message=system_message)
    if pixel_values is not None:
        text = text.replace(IMAGE_PLACEHOLDER, image_token_span(num_image_token, len(pixel_values)), 1)
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        input_ids = [tokenizer.bos_token_id, *input_ids]
    return Prompt(input_ids, pixel_values)


def left_pad(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into `input_ids` and `attention_mask` `[B, T]`.

    Example, pad id 9::

        [[5, 6, 7], [5, 8]] -> input_ids [[5, 6, 7], [9, 5, 8]], attention_mask [[1, 1, 1], [0, 1, 1]]
    """
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, length - len(ids) :] = 1
    return input_ids, attention_mask


def answer_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[dict[str, Any]],
    *,
    template: str = "internvl2_5",
    system_message: str | None = None,
    image_size: int,
    num_image_token: int,
    max_dynamic_patch: int,
    use_thumbnail: bool,
    normalize_type: str = "imagenet",
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> list[str]:
    """Answer each `{"image": path | PIL image | None, "question": str}` item by greedy decoding.

    Args:
        model: an `InternVLForConditionalGeneration` (PEFT-wrapped is fine); put in eval mode for the call.
        tokenizer: its tokenizer; `pad_token_id` must be set.
        items: the questions, each with an optional image.
        template: conversation template name, as used in training (`conv_style`).
        system_message: the training `system_message` (None = the template default).
        image_size: tile side in pixels (`image_geometry(model.config).image_size`).
        num_image_token: image tokens per tile (`image_geometry(model.config).num_image_token`).
        max_dynamic_patch: most tiles per image.
        use_thumbnail: append a thumbnail tile to multi-tile images.
        normalize_type: pixel normalisation statistics.
        max_new_tokens: longest answer in tokens.
        batch_size: prompts per `generate` call.

    Returns:
        One answer per item: the new tokens decoded without special tokens, stripped.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; batched generation needs one")
    chat = get_template(template)
    transform = ImageTransform(image_size, normalize_type)
    eos_token_id = stop_token_ids(tokenizer, chat)
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            prompts = [
                build_prompt(
                    tokenizer,
                    chat,
                    item,
                    system_message=system_message,
                    image_size=image_size,
                    num_image_token=num_image_token,
                    max_dynamic_patch=max_dynamic_patch,
                    use_thumbnail=use_thumbnail,
                    transform=transform,
                )
                for item in items[start : start + batch_size]
            ]
            input_ids, attention_mask = left_pad([p.input_ids for p in prompts], tokenizer.pad_token_id)
            tiles = [p.pixel_values for p in prompts if p.pixel_values is not None]
            device = model.device
            # generate() runs the vision encoder on any `pixel_values` key, even None: pass it only with tiles.
            images = {"pixel_values": torch.cat(tiles).to(device, model.dtype)} if tiles else {}
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    **images,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )  # [B, T + new]
            new_tokens = output[:, input_ids.shape[1] :]
            answers += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers
