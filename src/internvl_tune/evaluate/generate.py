"""Greedy answers from an InternVL model to image questions, with the prompt rendered exactly as in training.

An item `{"image": "a.png", "question": "What colour is the shape?"}` becomes the user turn
`"<image>\\nWhat colour is the shape?"` and then a prompt by `build_inference_prompt` (data/prompt.py), the one
every generating command uses: the conversation template with the bare assistant role at the end, `<image>`
expanded to `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>` with the image tiled by the training
settings. So with 4 image tokens per tile and a 2x1 grid plus thumbnail (3 tiles), the prompt holds 12
`<IMG_CONTEXT>` tokens and `pixel_values` is `[3, 3, S, S]`.

Prompts of a batch are padded on the LEFT, with an explicit attention mask, so that every row's last prompt token
sits at the same position and the new tokens follow it directly; `generate` derives position ids from the mask, so a
batched answer equals the one-at-a-time answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from internvl_tune.data.prompt import InferencePrompt, build_inference_prompt, user_turn
from internvl_tune.data.templates import get_template, stop_token_ids
from internvl_tune.data.transform import SampleSettings


def item_prompt(tokenizer: PreTrainedTokenizerBase, item: dict[str, Any], settings: SampleSettings) -> InferencePrompt:
    """The prompt for one `{"image": path | PIL image | None, "question": str}` item."""
    images = [item["image"]] if item.get("image") is not None else []
    messages = [{"role": "user", "content": user_turn(item["question"], len(images))}]
    return build_inference_prompt(tokenizer, messages, images, settings)


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
    settings: SampleSettings,
    *,
    max_new_tokens: int = 16,
    batch_size: int = 8,
) -> list[str]:
    """Answer each `{"image": path | PIL image | None, "question": str}` item by greedy decoding.

    Args:
        model: an `InternVLForConditionalGeneration` (PEFT-wrapped is fine); put in eval mode for the call.
        tokenizer: its tokenizer; `pad_token_id` must be set.
        items: the questions, each with an optional image.
        settings: the template, system message and image settings the model was trained with, its tile size and
            image tokens per tile (`sample_settings(data_args, model.config)`).
        max_new_tokens: longest answer in tokens.
        batch_size: prompts per `generate` call.

    Returns:
        One answer per item: the new tokens decoded without special tokens, stripped.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; batched generation needs one")
    eos_token_id = stop_token_ids(tokenizer, get_template(settings.template))
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            prompts = [item_prompt(tokenizer, item, settings) for item in items[start : start + batch_size]]
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
