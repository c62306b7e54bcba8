"""Padding collator for SFT micro-batches, with an explicit attention mask (never `input_ids != 0`)."""

from __future__ import annotations

from typing import Any

import torch

from internvl_tune.constants import IGNORE_INDEX


def pad_collate(samples: list[dict[str, Any]], pad_token_id: int, dummy_tile: torch.Tensor) -> dict[str, Any]:
    """Right-pad samples to the longest one and concatenate their tiles.

    Skipped samples (`{"skipped": ...}`) are dropped and listed under `skipped`. A batch with no tiles at all
    gets `dummy_tile` with `image_flags = False` so that the ViT runs on every rank (its features are unused).

    Example, two samples of lengths 3 and 2, pad id 9::

        input_ids      [[5, 6, 7], [5, 8, 9]]
        attention_mask [[1, 1, 1], [1, 1, 0]]
        position_ids   [[0, 1, 2], [0, 1, 0]]
        labels         [[-100, 6, 7], [-100, 8, -100]]

    Returns:
        input_ids, labels, position_ids [B, T] long; attention_mask [B, T] long; pixel_values [N, 3, S, S];
        image_flags [N] bool; skipped (list of (where, message)); num_samples; num_image_tokens;
        num_text_tokens; num_pad_tokens; num_truncated.
    """
    skipped = [(s["where"], s["skipped"]) for s in samples if "skipped" in s]
    samples = [s for s in samples if "skipped" not in s]
    batch: dict[str, Any] = {"skipped": skipped, "num_samples": len(samples)}
    if not samples:
        return batch
    max_len = max(len(s["input_ids"]) for s in samples)
    batch_size = len(samples)
    input_ids = torch.full((batch_size, max_len), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, max_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long)
    position_ids = torch.zeros((batch_size, max_len), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n] = s["input_ids"]
        labels[row, :n] = s["labels"]
        attention_mask[row, :n] = 1
        position_ids[row, :n] = torch.arange(n)
    tiles = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    if tiles:
        pixel_values = torch.cat(tiles)
        image_flags = torch.ones(len(pixel_values), dtype=torch.bool)
    else:
        pixel_values = dummy_tile.unsqueeze(0)
        image_flags = torch.zeros(1, dtype=torch.bool)
    batch.update(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        position_ids=position_ids,
        pixel_values=pixel_values,
        image_flags=image_flags,
        num_image_tokens=sum(s["num_image_tokens"] for s in samples),
        num_text_tokens=sum(s["num_text_tokens"] for s in samples),
        num_pad_tokens=int(batch_size * max_len - attention_mask.sum()),
        num_truncated=sum(bool(s["truncated"]) for s in samples),
    )
    return batch
