"""Logit parity of a loaded model with the original InternVL forward (`original_forward.original_logits`), on a
batch that exercises image placement: one row with a 3-tile image, one row with two 1-tile images."""

from __future__ import annotations

import torch

from internvl_tune.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl_tune.testing.original_forward import original_logits

TOKENS_PER_TILE = 4  # a 56 px tile of the tiny configs: (56 / 14)^2 patches, 4 after the 0.5 pixel shuffle


def multimodal_inputs(tokenizer, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0: one image of 3 tiles; row 1: two images of 1 tile each. Both rows 40 tokens, no padding."""
    ids = tokenizer.convert_tokens_to_ids

    def span(tiles):
        return [ids(IMG_START_TOKEN)] + [ids(IMG_CONTEXT_TOKEN)] * (TOKENS_PER_TILE * tiles) + [ids(IMG_END_TOKEN)]

    text = tokenizer("What colour is the shape? There are two shapes.", add_special_tokens=False).input_ids
    row0 = text[:5] + span(3) + text[5:]
    row1 = span(1) + text[:4] + span(1) + text[4:]
    length = max(len(row0), len(row1))
    row0, row1 = (row + text[: length - len(row)] for row in (row0, row1))
    generator = torch.Generator().manual_seed(seed)
    return torch.tensor([row0, row1]), torch.randn(5, 3, 56, 56, generator=generator)


def max_logit_diff(model, state_dict, config, tokenizer) -> float:
    """Max |logit difference| between `model` and the original forward of `state_dict` / `config` (original
    layout) on `multimodal_inputs`."""
    input_ids, pixel_values = multimodal_inputs(tokenizer)
    with torch.no_grad():
        ours = model(input_ids=input_ids, pixel_values=pixel_values).logits
    expected = original_logits(
        state_dict,
        config,
        input_ids,
        pixel_values,
        img_context_token_id=tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN),
    )
    return (ours.double() - expected).abs().max().item()
