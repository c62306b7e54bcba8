"""Greedy answers from an InternVL model to image questions, with the prompt rendered exactly as in training.

An item `{"image": "a.png", "question": "What colour is the shape?"}` becomes the user turn
`"<image>\\nWhat colour is the shape?"` and then a prompt by `build_inference_prompt` (data/prompt.py), the one
every generating command uses: the conversation template with the bare assistant role at the end, `<image>`
expanded to `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>` with the image tiled by the training
settings. So with 4 image tokens per tile and a 2x1 grid plus thumbnail (3 tiles), the prompt holds 12
`<IMG_CONTEXT>` tokens and `pixel_values` is `[3, 3, S, S]`.

Generation runs through the `hf` backend (generation/hf.py): batched with left padding, so a batched answer
equals the one-at-a-time answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from internvl_tune.data.placeholders import user_turn
from internvl_tune.data.prompt import InferencePrompt, build_inference_prompt
from internvl_tune.data.transform import SampleSettings
from internvl_tune.generation.base import GenerationRequest, SamplingParams
from internvl_tune.generation.hf import HFBackend, left_pad

__all__ = ["answer_questions", "item_prompt", "left_pad"]


def item_messages(item: dict[str, Any]) -> tuple[list[dict[str, str]], list[Any]]:
    """The conversation and images of one `{"image": path | PIL image | None, "question": str}` item."""
    images = [item["image"]] if item.get("image") is not None else []
    return [{"role": "user", "content": user_turn(item["question"], len(images))}], images


def item_prompt(tokenizer: PreTrainedTokenizerBase, item: dict[str, Any], settings: SampleSettings) -> InferencePrompt:
    """The prompt for one `{"image": path | PIL image | None, "question": str}` item."""
    messages, images = item_messages(item)
    return build_inference_prompt(tokenizer, messages, images, settings)


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
    params = SamplingParams(n=1, temperature=0, max_new_tokens=max_new_tokens)
    requests = [GenerationRequest(*item_messages(item), params) for item in items]
    answers = HFBackend(model, tokenizer, settings, batch_size=batch_size).generate(requests)
    return [texts[0].strip() for texts in answers]
