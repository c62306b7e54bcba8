"""Collators: padded or packed SFT micro-batches, and preference pairs (shared or separate layout, packed or not).

Padding is always described explicitly (an attention mask or attention groups), never inferred from `input_ids != 0`.
Position ids come with each sample (`SampleBuilder.position_ids`: 0, 1, 2, ... or V2PE's, data/v2pe.py) and are
placed as they are; padding takes position 0.
"""

from __future__ import annotations

from typing import Any

import torch

from internvl_tune.constants import CHOSEN_ROLE, IGNORE_INDEX, PADDING_GROUP, REJECTED_ROLE
from internvl_tune.data.errors import DataError


def pad_collate(samples: list[dict[str, Any]], pad_token_id: int, dummy_tile: torch.Tensor) -> dict[str, Any]:
    """Right-pad samples to the longest one and concatenate their tiles.

    Skipped samples (`{"skipped": ...}`) are dropped and listed under `skipped`. A batch with no tiles at all
    gets `dummy_tile` with `image_flags = False` so that the ViT runs on every rank (its features are unused).

    Example, two samples of lengths 3 and 2, pad id 9::

        input_ids      [[5, 6, 7], [5, 8, 9]]
        attention_mask [[1, 1, 1], [1, 1, 0]]
        position_ids   [[0, 1, 2], [0, 1, 0]]
        labels         [[-100, 6, 7], [-100, 8, -100]]
        sample_ids     [[0, 0, 0], [1, 1, -1]]

    Returns:
        input_ids, labels [B, T] long; position_ids [B, T] (the samples' own: long, or float32 with V2PE);
        attention_mask [B, T] long; sample_ids [B, T] (the sample each token belongs to, -1 for padding); num_labels
        [S] (each sample's supervised tokens); pixel_values [N, 3, S, S]; image_flags [N] bool; skipped (list of
        (where, message)); num_samples; num_image_tokens; num_text_tokens; num_pad_tokens; num_truncated.
    """
    return _collate_rows(samples, pad_token_id, dummy_tile, packed=False)


def pack_collate(
    samples: list[dict[str, Any]], pad_token_id: int, dummy_tile: torch.Tensor, max_packed_tokens: int
) -> dict[str, Any]:
    """Collate packed rows: the samples of each row slot (`"row"`, set by `PackedDataset`) one after another, the rows
    right-padded to the longest. Each sample keeps its own position ids (restarting at 0) and attends only to itself:
    the rows are described by `attention_groups` (the sample's place in its row; -1 for padding) and
    `attention_roles` (all 0), which the model turns into a block mask (model/attention.py).

    Example, row 0 = samples of lengths 3 and 2, row 1 = one sample of length 4, pad id 9::

        input_ids        [[5, 6, 7, 5, 8], [5, 1, 2, 3, 9]]
        position_ids     [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
        attention_groups [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]]
        sample_ids       [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]]

    The first label of every sample is ignored, so no token is trained to predict the next sample's start.

    Raises:
        DataError: a row of several samples is longer than `max_packed_tokens`: the length cache no longer matches
            the data (an image was replaced by one of another size).
    """
    return _collate_rows(samples, pad_token_id, dummy_tile, packed=True, max_packed_tokens=max_packed_tokens)


def _collate_rows(
    samples: list[dict[str, Any]],
    pad_token_id: int,
    dummy_tile: torch.Tensor,
    *,
    packed: bool,
    max_packed_tokens: int = 0,
) -> dict[str, Any]:
    skipped = [(s["where"], s["skipped"]) for s in samples if "skipped" in s]
    samples = [s for s in samples if "skipped" not in s]
    batch: dict[str, Any] = {"skipped": skipped, "num_samples": len(samples)}
    if not samples:
        return batch
    if packed:
        slots = sorted({s["row"] for s in samples})
        rows = [[s for s in samples if s["row"] == slot] for slot in slots]
        samples = [s for row in rows for s in row]  # row order: the order of their tiles and image tokens
    else:
        rows = [[s] for s in samples]
    lengths = [sum(len(s["input_ids"]) for s in row) for row in rows]
    if packed:
        for row, length in zip(rows, lengths, strict=True):
            if len(row) > 1 and length > max_packed_tokens:
                raise DataError(
                    f"{row[0]['where']}: a packed row holds {length} tokens, more than max_packed_tokens="
                    f"{max_packed_tokens}: its samples are longer than their cached lengths (an image was replaced "
                    "by one of another size?); delete the .internvl_tune_cache folder beside the annotation file",
                    "stale length cache",
                )
    max_len = max(lengths)
    shape = (len(rows), max_len)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=_position_dtype([s["position_ids"] for s in samples]))
    sample_ids = torch.full(shape, PADDING_GROUP, dtype=torch.long)
    groups = torch.full(shape, PADDING_GROUP, dtype=torch.long)
    num_labels = torch.zeros(len(samples), dtype=torch.long)
    sample = 0
    for r, row in enumerate(rows):
        start = 0
        for k, s in enumerate(row):
            n = len(s["input_ids"])
            input_ids[r, start : start + n] = s["input_ids"]
            labels[r, start : start + n] = s["labels"]
            labels[r, start] = IGNORE_INDEX  # never predicted across a sample boundary
            position_ids[r, start : start + n] = s["position_ids"]
            sample_ids[r, start : start + n] = sample
            groups[r, start : start + n] = k
            num_labels[sample] = int((labels[r, start : start + n] != IGNORE_INDEX).sum())
            start += n
            sample += 1
    pixel_values, image_flags = _tiles(samples, dummy_tile)
    if packed:
        layout = {"attention_groups": groups, "attention_roles": torch.zeros(shape, dtype=torch.long)}
    else:
        layout = {"attention_mask": (sample_ids != PADDING_GROUP).long()}
    batch.update(
        input_ids=input_ids,
        labels=labels,
        **layout,
        position_ids=position_ids,
        sample_ids=sample_ids,
        num_labels=num_labels,
        pixel_values=pixel_values,
        image_flags=image_flags,
        num_image_tokens=sum(s["num_image_tokens"] for s in samples),
        num_text_tokens=sum(s["num_text_tokens"] for s in samples),
        num_pad_tokens=len(rows) * max_len - sum(lengths),
        num_truncated=sum(bool(s["truncated"]) for s in samples),
    )
    return batch


def pair_collate(
    samples: list[dict[str, Any]], pad_token_id: int, dummy_tile: torch.Tensor, *, mode: str = "shared"
) -> dict[str, Any]:
    """Collate preference pairs for one forward pass, in one of two layouts.

    `shared` (one row per pair): `[prompt | chosen | rejected | pad]`. Rejected tokens attend to the prompt and
    to themselves, never to the chosen answer, and their position ids restart at the end of the prompt (the pair's
    `*_position_ids`, so V2PE positions too), so each response sees exactly what it would see alone; the tiles go
    through the ViT once. Example, P=2, Lc=2, Lr=1 (rows = queries, columns = keys, 1 = may attend)::

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
    if mode == "shared" and "row" in samples[0]:
        # Packed: the pairs of each row slot one after another, each its own attention group.
        slots = sorted({s["row"] for s in samples})
        samples = [s for slot in slots for s in samples if s["row"] == slot]
        slot_of = [slots.index(s["row"]) for s in samples]
    else:
        slot_of = list(range(len(samples)))
    num_pairs = len(samples)
    if mode == "shared":
        row_parts = [[] for _ in range(max(slot_of) + 1)]
        for s, slot in zip(samples, slot_of, strict=True):
            row_parts[slot] += [s["prompt_ids"], s["chosen_ids"], s["rejected_ids"]]
        rows = [torch.cat(parts) for parts in row_parts]
    else:
        rows = [torch.cat([s["prompt_ids"], s[f"{side}_ids"]]) for side in ("chosen", "rejected") for s in samples]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    dtype = _position_dtype([s["prompt_position_ids"] for s in samples])
    position_ids = torch.zeros((len(rows), length), dtype=dtype)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
    gather = {side: _response_gather(samples, side) for side in ("chosen", "rejected")}
    if mode == "shared":
        # The row's layout, not its T x T mask: the model side turns it into a dense mask (SDPA) or a flex-attention
        # BlockMask (model/attention.py). Padding is group -1.
        groups = torch.full((len(rows), length), PADDING_GROUP, dtype=torch.long)
        roles = torch.zeros((len(rows), length), dtype=torch.long)
        fill = [0] * len(rows)  # tokens placed so far in each row
        for i, (s, slot) in enumerate(zip(samples, slot_of, strict=True)):
            p, c, r = len(s["prompt_ids"]), len(s["chosen_ids"]), len(s["rejected_ids"])
            o = fill[slot]
            groups[slot, o : o + p + c + r] = sum(1 for j in range(i) if slot_of[j] == slot)
            roles[slot, o + p : o + p + c] = CHOSEN_ROLE
            roles[slot, o + p + c : o + p + c + r] = REJECTED_ROLE
            position_ids[slot, o : o + p + c + r] = torch.cat(
                [s["prompt_position_ids"], s["chosen_position_ids"], s["rejected_position_ids"]]
            )
            gather["chosen"]["positions"][i] += o
            gather["rejected"]["positions"][i] += o + c  # rejected sits after the chosen answer
            gather["rejected"]["positions"][i, 0] = o + p - 1  # ... but its first token is predicted from the prompt
            fill[slot] += p + c + r
        layout = {"attention_groups": groups, "attention_roles": roles}
        rows_of = {"chosen": torch.tensor(slot_of), "rejected": torch.tensor(slot_of)}
        tiles_repeat = 1
    else:
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        sides = [(s, side) for side in ("chosen", "rejected") for s in samples]  # the rows' order
        for i, (s, side) in enumerate(sides):
            attention_mask[i, : len(rows[i])] = 1
            position_ids[i, : len(rows[i])] = torch.cat([s["prompt_position_ids"], s[f"{side}_position_ids"]])
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


def _position_dtype(positions: list[torch.Tensor]) -> torch.dtype:
    """float32 when any sample has fractional (V2PE) positions, else long."""
    return torch.float32 if any(p.is_floating_point() for p in positions) else torch.long


def group_collate(groups: list[dict[str, Any]], pad_token_id: int, dummy_tile: torch.Tensor) -> dict[str, Any]:
    """Collate RL groups, one row each: `[prompt | r1 | ... | rG | pad]`, so a prompt's image and text go through the
    model once for its G responses. Every response attends to the prompt and to itself (roles 1..G,
    model/attention.py) and its position ids continue from the prompt's end, so each sees exactly what it would see
    alone. Example, P=2 and responses of 2 and 1 tokens::

        tokens    p0 p1 a0 a1 b0        position ids  0 1 2 3 2
        roles      0  0  1  1  2        b0 sees p0 p1 and itself, never a0 a1

    Log-probs are read per response token with a flat gather (`logp_index`: row * T + the position whose logits
    predict the token; every response's first token is predicted from the last prompt position).

    Args:
        groups: per prompt, `prompt_ids` [P] long, `prompt_position_ids` [P], `pixel_values` [n, 3, S, S] or None,
            `num_image_tokens`, and `responses`: a list of response token ids (long tensors, at least one token).

    Returns:
        input_ids, position_ids, attention_groups, attention_roles [R, T]; pixel_values, image_flags; logp_index,
        logp_targets, response_of_token [K] (which response, numbered over the batch in order, each token is);
        response_lengths [N]; num_groups, num_responses, num_image_tokens, num_text_tokens, num_pad_tokens.
    """
    if any(len(g["responses"]) == 0 or any(len(r) == 0 for r in g["responses"]) for g in groups):
        raise ValueError("every group needs at least one response, and every response at least one token")
    rows = [torch.cat([g["prompt_ids"], *g["responses"]]) for g in groups]
    length = max(len(r) for r in rows)
    shape = (len(rows), length)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=_position_dtype([g["prompt_position_ids"] for g in groups]))
    attention_groups = torch.full(shape, PADDING_GROUP, dtype=torch.long)
    roles = torch.zeros(shape, dtype=torch.long)
    index, targets, response_of_token, lengths = [], [], [], []
    for i, (g, row) in enumerate(zip(groups, rows, strict=True)):
        p = len(g["prompt_ids"])
        input_ids[i, : len(row)] = row
        attention_groups[i, : len(row)] = 0
        position_ids[i, :p] = g["prompt_position_ids"]
        start, after_prompt = p, g["prompt_position_ids"][-1] + 1
        for j, response in enumerate(g["responses"]):
            n = len(response)
            roles[i, start : start + n] = 1 + j
            position_ids[i, start : start + n] = after_prompt + torch.arange(n)
            predicting = torch.cat([torch.tensor([p - 1]), torch.arange(start, start + n - 1)])
            index.append(i * length + predicting)
            targets.append(response)
            response_of_token.append(torch.full((n,), len(lengths)))
            lengths.append(n)
            start += n
    pixel_values, image_flags = _tiles(groups, dummy_tile)
    num_image_tokens = sum(g["num_image_tokens"] for g in groups)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "attention_groups": attention_groups,
        "attention_roles": roles,
        "pixel_values": pixel_values,
        "image_flags": image_flags,
        "logp_index": torch.cat(index),
        "logp_targets": torch.cat(targets),
        "response_of_token": torch.cat(response_of_token),
        "response_lengths": torch.tensor(lengths),
        "num_groups": len(groups),
        "num_responses": len(lengths),
        "num_image_tokens": num_image_tokens,
        "num_text_tokens": sum(len(r) for r in rows) - num_image_tokens,
        "num_pad_tokens": len(rows) * length - sum(len(r) for r in rows),
    }


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
