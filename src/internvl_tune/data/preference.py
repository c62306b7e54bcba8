"""Preference pairs (MMPR format): validation, one shared prompt, chosen and rejected responses.

A record is `{"image": str | [str] (optional), "video": str (optional), "question": str, "chosen": str,
"rejected": str, ...}`; extra keys are kept in the sample's `meta`. It is read through the same meta JSON,
`repeat_time` rule and media expansion as SFT data. Both answers are rendered with the template as
`[user: question, assistant: answer]`; the tokens before the first trained token are the same for both (each
template segment is tokenized on its own), and that common prefix is the pair's prompt.

Example (internvl2_5, one tile of 4 image tokens)::

    prompt   = "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n<img>" + 4 x <IMG_CONTEXT> +
               "</img>\\nWhat colour?<|im_end|>\\n<|im_start|>assistant\\n"
    chosen   = "red<|im_end|>\\n"    labels: trained on "red<|im_end|>", not on the final "\\n"
    rejected = "blue<|im_end|>\\n"
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import torch

from internvl_tune.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER
from internvl_tune.data.errors import DataError
from internvl_tune.data.meta import DatasetEntry
from internvl_tune.data.transform import Conversation, SampleBuilder, record_to_conversation

PAIR_FIELDS = ("question", "chosen", "rejected")


def record_to_pair(record: dict[str, Any], where: str) -> tuple[Conversation, str, str]:
    """Validate a preference record; return the prompt conversation (user turn only), chosen and rejected.

    Raises:
        DataError: a missing or empty field, chosen identical to rejected, bad media fields, placeholder counts.
    """
    if "conversations" in record and not any(key in record for key in PAIR_FIELDS):
        raise DataError(
            f"{where}: this looks like an SFT record ('conversations'), not a preference pair: a pair needs "
            f"{', '.join(repr(k) for k in PAIR_FIELDS)} (non-empty strings) beside its image or video "
            "(docs/data_formats.md); train SFT data with `internvl-tune sft`",
            "missing field",
        )
    for key in PAIR_FIELDS:
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise DataError(f"{where}: field {key!r} is required and must be a non-empty string", "missing field")
    if record["chosen"].strip() == record["rejected"].strip():
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same answer", "invalid pair")
    # Validate media and placeholders with the SFT rules on the chosen conversation.
    as_sft = {k: v for k, v in record.items() if k not in PAIR_FIELDS}
    as_sft["conversations"] = [
        {"from": "human", "value": record["question"]},
        {"from": "gpt", "value": record["chosen"]},
    ]
    conversation = record_to_conversation(as_sft, where)
    if IMAGE_PLACEHOLDER in record["chosen"] or IMAGE_PLACEHOLDER in record["rejected"]:
        raise DataError(f"{where}: '<image>' placeholders are only allowed in the question", "image count")
    conversation.messages = conversation.messages[:1]
    return conversation, record["chosen"], record["rejected"]


def record_key(record: dict[str, Any], entry_name: str) -> str:
    """A stable hash of a record's content and dataset: the key of precomputed reference log-probs."""
    payload = json.dumps({"dataset": entry_name, "record": record}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def pair_media_paths(record: dict[str, Any], where: str, entry: DatasetEntry | None) -> list[str]:
    """The media a pair's pixels come from, resolved against the dataset root: its images, or its video (a file or
    a folder of frames). The reference cache keys a pair by these files' bytes as well as by its record.

    A record that is not a valid pair names no media here: it is refused when it is built, and its record alone
    keys it.
    """
    try:
        conversation, _, _ = record_to_pair(record, where)
    except DataError:
        return []
    paths = conversation.images or ([conversation.video] if conversation.video is not None else [])
    return [entry.resolve(p) if entry else p for p in paths]


class PairBuilder:
    """Turns preference records into pair samples, sharing the media expansion of `SampleBuilder`."""

    def __init__(self, builder: SampleBuilder):
        self.builder = builder

    def measure(self, record: dict[str, Any], where: str, entry: DatasetEntry | None) -> tuple[int, int]:
        """(tokens, tiles) of the pair's shared row `[prompt | chosen | rejected]`, without decoding pixels (see
        `SampleBuilder.measure`)."""
        conversation, chosen, rejected = record_to_pair(record, where)
        media = self.builder.expand(conversation, where, entry, None, load_pixels=False, decode=False)
        lengths, prompt_length = [], 0
        for input_ids, labels, _ in self._tokenize(media, chosen, rejected, where):
            lengths.append(len(input_ids))
            prompt_length = labels.index(next(label for label in labels if label != IGNORE_INDEX))
        return lengths[0] + lengths[1] - prompt_length, sum(media.num_tiles)

    def _tokenize(self, media, chosen: str, rejected: str, where: str):
        """(input_ids, labels, truncated) of `[prompt, chosen]` then `[prompt, rejected]`."""
        conversations = [[*media.messages, {"role": "assistant", "content": answer}] for answer in (chosen, rejected)]
        return self.builder.tokenize_each(conversations, where, media.num_image_tokens)

    def __call__(
        self,
        record: dict[str, Any],
        where: str,
        entry: DatasetEntry | None,
        rng: random.Random,
        *,
        load_pixels: bool = True,
    ) -> dict[str, Any]:
        """Build one pair.

        Returns:
            `prompt_ids` [P], `chosen_ids` / `rejected_ids` [Lc] / [Lr] (response tokens after the prompt),
            `chosen_labels` / `rejected_labels` (same lengths; IGNORE_INDEX where no loss), `prompt_position_ids`,
            `chosen_position_ids`, `rejected_position_ids` (both answers continue the prompt's positions, made with
            the same V2PE strides: `SampleBuilder.position_ids`), `pixel_values` [N, 3, S, S] or None, `num_tiles`,
            `num_image_tokens`, `key` (for the reference cache), `where`, `meta` (the record's extra keys),
            `truncated` (an answer was cut to max_seq_length).
        """
        conversation, chosen, rejected = record_to_pair(record, where)
        media = self.builder.expand(conversation, where, entry, rng, load_pixels=load_pixels)
        sequences = list(self._tokenize(media, chosen, rejected, where))
        (chosen_ids, chosen_labels, chosen_cut), (rejected_ids, rejected_labels, rejected_cut) = sequences
        prompt_length = chosen_labels.index(next(label for label in chosen_labels if label != IGNORE_INDEX))
        if rejected_ids[:prompt_length] != chosen_ids[:prompt_length] or any(
            label != IGNORE_INDEX for label in rejected_labels[:prompt_length]
        ):
            raise DataError(f"{where}: chosen and rejected do not share their prompt tokens", "template mismatch")
        strides = self.builder.image_strides(len(media.num_tiles), rng)
        chosen_positions = self.builder.position_ids(chosen_ids, strides)
        rejected_positions = self.builder.position_ids(rejected_ids, strides)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return {
            "prompt_ids": as_tensor(chosen_ids[:prompt_length]),
            "chosen_ids": as_tensor(chosen_ids[prompt_length:]),
            "chosen_labels": as_tensor(chosen_labels[prompt_length:]),
            "rejected_ids": as_tensor(rejected_ids[prompt_length:]),
            "rejected_labels": as_tensor(rejected_labels[prompt_length:]),
            "prompt_position_ids": chosen_positions[:prompt_length],
            "chosen_position_ids": chosen_positions[prompt_length:],
            "rejected_position_ids": rejected_positions[prompt_length:],
            "pixel_values": media.pixel_values,
            "num_tiles": media.num_tiles,
            "num_image_tokens": media.num_image_tokens,
            "truncated": chosen_cut or rejected_cut,
            "key": record_key(record, entry.name if entry else ""),
            "where": where,
            "meta": {k: v for k, v in record.items() if k not in (*PAIR_FIELDS, "image", "video", "clip")},
        }
