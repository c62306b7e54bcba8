"""V2PE, variable visual position encoding (InternVL3; Ge et al. 2024, arXiv:2412.09616): the position ids of a
sample whose image tokens advance the RoPE position by less than text tokens do.

The rule, as OpenGVLab/InternVL's unmerged pull request #1000 computes it (`internvl_chat/internvl/v2pe_utils.py::
get_rope_pos_id`), with N = the model's image tokens per tile (256 in the released InternVL models, 4 in our tiny
test models) and a stride S per image:

- every text token, `<img>` and `</img>` included, advances the position by 1;
- the N x T `<IMG_CONTEXT>` tokens of an image of T tiles after its `<img>` at position p take
  p + delta, p + 2 delta, ..., p + N T delta, with delta = S / N: the image spans S positions per tile;
- the token after the image (its `</img>`) takes ceil(p + S T) + 1 = p + S T + 1 (S is an integer, so the ceil of
  the pull request changes nothing), and the text goes on by 1 from there.

S = N gives delta 1: exactly the plain positions 0, 1, 2, ... . Worked example, N = 4, one image of one tile after
two text tokens, S = 2 (delta 1/2)::

    tokens     t0  t1  <img>   c    c    c    c   </img>  t2
    positions   0   1    2    2.5   3   3.5   4     5      6

and with S = 4 the same tokens take 0, 1, ..., 8. `fixed` mode uses one S (`data.v2pe_stride`) for every image;
`random` mode draws S for each image (each video frame is an image of one tile) from the powers of two up to N,
{1, 2, 4, ..., N} ({1, 2, 4, ..., 256} for the released models), with the sample's own random stream: a pure function of
(seed, epoch, sample), like its augmentation. Inference (chat, eval, sampling) always uses the fixed stride the
checkpoint records in `internvl_tune.json` (docs/v2pe.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


def random_strides(tokens_per_tile: int) -> list[int]:
    """The strides `random` mode draws from: the powers of two up to `tokens_per_tile`, and `tokens_per_tile` itself
    (delta 1) when it is not one. 256 -> [1, 2, 4, ..., 256]; 4 -> [1, 2, 4]."""
    strides = [2**k for k in range(tokens_per_tile.bit_length()) if 2**k <= tokens_per_tile]
    return strides if strides[-1] == tokens_per_tile else [*strides, tokens_per_tile]


def draw_strides(rng: random.Random, num_images: int, tokens_per_tile: int) -> list[int]:
    """One stride per image, drawn uniformly from `random_strides(tokens_per_tile)`."""
    choices = random_strides(tokens_per_tile)
    return [rng.choice(choices) for _ in range(num_images)]


def v2pe_position_ids(
    input_ids: Sequence[int],
    strides: Sequence[int],
    *,
    tokens_per_tile: int,
    img_start_id: int,
    img_end_id: int,
) -> torch.Tensor:
    """Float32 position ids [T] of one sequence by the rule of the module docstring, `strides[k]` for its k-th image.

    Raises:
        ValueError: the images of `input_ids` are not `len(strides)` `<img> ... </img>` spans of whole tiles (the
            data pipeline makes them so; an image cut by truncation is refused before this).
    """
    ids = list(input_ids)
    positions = torch.empty(len(ids), dtype=torch.float64)  # exact for the fractions; float32 at the end, as RoPE
    next_position = 0  # integer: every text token's position is one
    t = 0
    image = 0
    while t < len(ids):
        positions[t] = next_position
        if ids[t] != img_start_id:
            next_position += 1
            t += 1
            continue
        try:
            end = ids.index(img_end_id, t + 1)
        except ValueError:
            raise ValueError(f"an <img> at token {t} has no </img>") from None
        num_tokens = end - t - 1
        if image >= len(strides) or num_tokens % tokens_per_tile:
            raise ValueError(
                f"image {image} has {num_tokens} image tokens for {len(strides)} strides and {tokens_per_tile} "
                "tokens per tile"
            )
        stride, num_tiles = strides[image], num_tokens // tokens_per_tile
        steps = torch.arange(1, num_tokens + 1, dtype=torch.float64)
        positions[t + 1 : end] = next_position + steps * stride / tokens_per_tile
        next_position += stride * num_tiles + 1  # the </img> after the image's S x T positions
        image += 1
        t = end
    if image != len(strides):
        raise ValueError(f"{image} images in the sequence for {len(strides)} strides")
    return positions.to(torch.float32)
