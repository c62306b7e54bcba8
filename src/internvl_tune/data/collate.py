"""Padding collator for SFT micro-batches, with an explicit attention mask (never `input_ids != 0`)."""

from __future__ import annotations

from typing import Any

import torch

from internvl_tune.constants import CHOSEN_ROLE, IGNORE_INDEX, PADDING_GROUP, REJECTED_ROLE


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
    pixel_values, image_flags = _tiles(samples, dummy_tile)
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


def pair_collate(
    samples: list[dict[str, Any]], pad_token_id: int, dummy_tile: torch.Tensor, *, mode: str = "shared"
) -> dict[str, Any]:
    """Collate preference pairs for one forward pass, in one of two layouts.

    `shared` (one row per pair): `[prompt | chosen | rejected | pad]`. Rejected tokens attend to the prompt and
    to themselves, never to the chosen answer, and their position ids restart at the end of the prompt, so each
    response sees exactly what it would see alone; the tiles go through the ViT once. Example, P=2, Lc=2, Lr=1
    (rows = queries, columns = keys, 1 = may attend)::

        tokens    p0 p1 c0 c1 r0        position ids  0 1 2 3 2
        p0         1  .  .  .  .
        p1         1  1  .  .  .
        c0         1  1  1  .  .
        c1         1  1  1  1  .
        r0         1  1  .  .  1

    `separate` (the original's layout, for checks): rows `[prompt | chosen]` for all pairs, then
    `[prompt | rejected]`; every tile is in the batch twice.

    Log-probs are read with explicit gather indices (`*_rows`, `*_positions`, `*_targets`, `*_mask`): the token at
    position a is predicted by the logits at a - 1, except the first rejected token in `shared` layout, which is
    predicted by the last prompt position.

    Returns:
        input_ids, position_ids [R, T]; for shared, attention_groups and attention_roles [R, T] (the row layout,
        see model/attention.py); for separate, attention_mask [R, T];
        pixel_values, image_flags; chosen_/rejected_ rows [B], positions, targets, mask [B, L]; and counts.
    """
    if mode not in ("shared", "separate"):
        raise ValueError(f"pair layout must be 'shared' or 'separate', got {mode!r}")
    skipped = [(s["where"], s["skipped"]) for s in samples if "skipped" in s]
    samples = [s for s in samples if "skipped" not in s]
    batch: dict[str, Any] = {"skipped": skipped, "num_pairs": len(samples)}
    if not samples:
        return batch
    num_pairs = len(samples)
    if mode == "shared":
        rows = [torch.cat([s["prompt_ids"], s["chosen_ids"], s["rejected_ids"]]) for s in samples]
    else:
        rows = [torch.cat([s["prompt_ids"], s[f"{side}_ids"]]) for side in ("chosen", "rejected") for s in samples]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
    gather = {side: _response_gather(samples, side) for side in ("chosen", "rejected")}
    if mode == "shared":
        # The row's layout, not its T x T mask: the model side turns it into a dense mask (SDPA) or a flex-attention
        # BlockMask (model/attention.py). Padding is group -1.
        groups = torch.full((num_pairs, length), PADDING_GROUP, dtype=torch.long)
        roles = torch.zeros((num_pairs, length), dtype=torch.long)
        for i, s in enumerate(samples):
            p, c, r = len(s["prompt_ids"]), len(s["chosen_ids"]), len(s["rejected_ids"])
            groups[i, : p + c + r] = 0
            roles[i, p : p + c] = CHOSEN_ROLE
            roles[i, p + c : p + c + r] = REJECTED_ROLE
            position_ids[i, : p + c + r] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
            gather["rejected"]["positions"][i] += c  # rejected sits after the chosen answer
            gather["rejected"]["positions"][i, 0] = p - 1  # ... but its first token is predicted from the prompt
        layout = {"attention_groups": groups, "attention_roles": roles}
        rows_of = {"chosen": torch.arange(num_pairs), "rejected": torch.arange(num_pairs)}
        tiles_repeat = 1
    else:
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            attention_mask[i, : len(row)] = 1
            position_ids[i, : len(row)] = torch.arange(len(row))
        rows_of = {"chosen": torch.arange(num_pairs), "rejected": torch.arange(num_pairs, 2 * num_pairs)}
        tiles_repeat = 2
        layout = {"attention_mask": attention_mask}
    pixel_values, image_flags = _tiles(samples, dummy_tile, repeat=tiles_repeat)
    batch.update(
        input_ids=input_ids,
        position_ids=position_ids,
        **layout,
        pixel_values=pixel_values,
        image_flags=image_flags,
        keys=[s["key"] for s in samples],
        num_image_tokens=sum(s["num_image_tokens"] for s in samples) * tiles_repeat,
        num_text_tokens=sum(len(r) for r in rows) - sum(s["num_image_tokens"] for s in samples) * tiles_repeat,
        num_pad_tokens=len(rows) * length - sum(len(r) for r in rows),
        num_truncated=sum(bool(s["truncated"]) for s in samples),
    )
    for side in ("chosen", "rejected"):
        batch[f"{side}_rows"] = rows_of[side]
        for name, value in gather[side].items():
            batch[f"{side}_{name}"] = value
    return batch


def _tiles(
    samples: list[dict[str, Any]], dummy_tile: torch.Tensor, repeat: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """All samples' tiles in order (the whole list `repeat` times), or one dummy tile flagged False when the
    batch has none, so that the ViT runs on every rank. Returns pixel_values [N, 3, S, S] and image_flags [N]."""
    tiles = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    if not tiles:
        return dummy_tile.unsqueeze(0), torch.zeros(1, dtype=torch.bool)
    pixel_values = torch.cat(tiles).repeat(repeat, 1, 1, 1)
    return pixel_values, torch.ones(len(pixel_values), dtype=torch.bool)


def _response_gather(samples: list[dict[str, Any]], side: str) -> dict[str, torch.Tensor]:
    """Gather indices for one response side, as if each response directly followed its prompt."""
    width = max(len(s[f"{side}_ids"]) for s in samples)
    positions = torch.zeros((len(samples), width), dtype=torch.long)
    targets = torch.zeros((len(samples), width), dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for i, s in enumerate(samples):
        p, labels = len(s["prompt_ids"]), s[f"{side}_labels"]
        n = len(labels)
        positions[i, :n] = torch.arange(p - 1, p - 1 + n)
        targets[i, :n] = torch.where(labels == IGNORE_INDEX, 0, labels)
        mask[i, :n] = labels != IGNORE_INDEX
    return {"positions": positions, "targets": targets, "mask": mask}
