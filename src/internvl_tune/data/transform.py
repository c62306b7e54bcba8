"""Record -> training sample: validation, `<image>` / `<video>` expansion, tiles, tokens and labels.

Two steps, as in torchtune: `record_to_conversation` turns an InternVL JSONL record into validated chat
messages plus the media it names; `SampleBuilder` turns those into `input_ids`, `labels` and pixel tiles for a
given model (its tile size and image-token count) and template. Every problem raises `DataError` naming the
record's `file:line`.

Worked example (single image, 4 image tokens per tile, 2x1 grid + thumbnail = 3 tiles): the record::

    {"image": "a.jpg", "conversations": [{"from": "human", "value": "What colour?"},
                                         {"from": "gpt", "value": "red"}]}

becomes the user turn ``"<img>" + "<IMG_CONTEXT>" * 12 + "</img>\\nWhat colour?"`` (the `<image>\\n` is prepended
because a single-image record has no placeholder), three tiles ``[3, S, S]``, and labels only on ``red<|im_end|>``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from internvl_tune.constants import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    VIDEO_PLACEHOLDER,
)
from internvl_tune.data.errors import DataError
from internvl_tune.data.images import (
    ImageTransform,
    dynamic_preprocess,
    image_size,
    load_image,
    num_tiles,
    tiles_budget,
)
from internvl_tune.data.meta import DatasetEntry
from internvl_tune.data.settings import PipelineSettings
from internvl_tune.data.templates import get_template, tokenize_conversations
from internvl_tune.data.v2pe import draw_strides, v2pe_position_ids
from internvl_tune.data.video import read_video_frames, video_prompt
from internvl_tune.errors import UserError

_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
# Image sizes a builder remembers while measuring (about 150 bytes each).
IMAGE_SIZES_REMEMBERED = 4096


@dataclass
class Conversation:
    """A validated record: chat messages (`<image>` / `<video>` placeholders not yet expanded) and its media.

    `images` are paths, or at inference (`data/prompt.py`) images already loaded.
    """

    messages: list[dict[str, str]]
    images: list[str | Image.Image]
    video: str | None = None
    clip: tuple[float, float] | None = None


def record_to_conversation(record: dict[str, Any], where: str) -> Conversation:
    """Validate an SFT record (docs/original-differences.md §2.3) and convert it to chat messages.

    Raises:
        DataError: for a missing or malformed `conversations`, an unknown role, a wrong role order, an empty or
            whitespace-only answer, or a `<image>` count that does not match the images.
    """
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field 'conversations' is required and must be a non-empty list", "missing field")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in _ROLES:
            raise DataError(
                f"{where}: conversations[{i}] must be {{'from': 'system'|'human'|'gpt', 'value': str}}, got {turn!r}",
                "bad turn",
            )
        messages.append({"role": _ROLES[turn["from"]], "content": turn["value"]})
    check_role_order(messages, where)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            # Its labels would be the end-of-turn token alone: training would teach the model to say nothing.
            raise DataError(f"{where}: conversations[{i}] is an empty 'gpt' answer", "empty answer")

    images = record.get("image") or []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DataError(f"{where}: field 'image' must be a path or a list of paths, got {record.get('image')!r}")
    video = record.get("video") if not images else None
    if video is not None and (not isinstance(video, str) or not video):
        raise DataError(f"{where}: field 'video' must be a path, got {video!r}")
    clip = record.get("clip")
    if clip is not None and not (
        isinstance(clip, list) and len(clip) == 2 and all(isinstance(c, (int, float)) for c in clip)
    ):
        raise DataError(f"{where}: field 'clip' must be [start_seconds, end_seconds], got {clip!r}")

    for m in messages:
        for token in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN):
            if token in m["content"]:
                raise DataError(
                    f"{where}: the text contains the literal token {token!r}; image tokens are inserted from the "
                    "'<image>' placeholders only",
                    "image count",
                )

    first_user = next(m for m in messages if m["role"] == "user")
    if len(images) == 1 and IMAGE_PLACEHOLDER not in first_user["content"]:
        first_user["content"] = IMAGE_PLACEHOLDER + "\n" + first_user["content"]
    if video is not None and VIDEO_PLACEHOLDER not in first_user["content"]:
        first_user["content"] = VIDEO_PLACEHOLDER + "\n" + first_user["content"]

    num_placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "user")
    if video is None and num_placeholders != len(images):
        raise DataError(
            f"{where}: {num_placeholders} '<image>' placeholder(s) in the human turns but {len(images)} image(s)",
            "image count",
        )
    if video is not None:
        if num_placeholders:
            raise DataError(f"{where}: a video record must not contain '<image>' placeholders", "image count")
        if sum(m["content"].count(VIDEO_PLACEHOLDER) for m in messages) != 1:
            raise DataError(f"{where}: a video record needs exactly one '<video>' placeholder", "image count")
    for m in messages:
        if m["role"] != "user" and (IMAGE_PLACEHOLDER in m["content"] or VIDEO_PLACEHOLDER in m["content"]):
            raise DataError(
                f"{where}: '<image>' / '<video>' placeholders are only allowed in human turns", "image count"
            )
    return Conversation(messages, images, video, tuple(clip) if clip else None)


def check_role_order(messages: list[dict[str, str]], where: str, *, allow_trailing_user: bool = False) -> None:
    """Optional system turn first, then human/gpt alternating, starting with human and ending with gpt."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    expected = ["user", "assistant"] * ((len(body) + 1) // 2)
    roles = [m["role"] for m in body]
    if not body or roles != expected[: len(roles)] or (roles[-1] != "assistant" and not allow_trailing_user):
        names = {v: k for k, v in _ROLES.items()}
        raise DataError(
            f"{where}: wrong role order {[names[m['role']] for m in messages]}; expected an optional 'system', "
            "then 'human' and 'gpt' alternating, starting with 'human' and ending with 'gpt'",
            "role order",
        )


def image_token_span(num_image_token: int, tiles: int) -> str:
    """`<img>` + `<IMG_CONTEXT>` x (num_image_token * tiles) + `</img>` (docs/original-differences.md §1.4)."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * tiles) + IMG_END_TOKEN


@dataclass
class ExpandedMedia:
    """A conversation's messages with image spans expanded, and its tiles."""

    messages: list[dict[str, str]]
    pixel_values: torch.Tensor | None  # [N, 3, S, S]; None for text, or when pixels were not requested
    num_tiles: list[int]  # per image, or 1 per video frame
    num_image_tokens: int


@dataclass
class SampleSettings(PipelineSettings):
    """How conversations become samples and prompts for one model: the pipeline settings (`PipelineSettings`,
    data/settings.py, with their defaults and meanings), the template, and the model's tile size and image tokens per tile
    (`sample_settings` fills these in from the model config). Field names follow the original InternVL flags."""

    template: str = DEFAULT_TEMPLATE
    image_size: int = 448
    num_image_token: int = 256


class SampleBuilder:
    """Turns validated records into model inputs for one tokenizer, template and image geometry."""

    def __init__(self, tokenizer, settings: SampleSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.template = get_template(settings.template, thinking=settings.thinking)
        self.img_context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if self.img_context_id is None or self.img_context_id == tokenizer.unk_token_id:
            raise UserError(f"the tokenizer has no {IMG_CONTEXT_TOKEN} token; is this an InternVL tokenizer?")
        self.img_end_id = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
        self.img_start_id = tokenizer.convert_tokens_to_ids(IMG_START_TOKEN)
        # The ids of the texts every sample repeats (system segment, assistant role, end tokens), filled on first use.
        self._token_memo: dict[str, list[int]] = {}
        self._image_sizes: dict[tuple[str, str], tuple[int, int]] = {}  # (root, path) -> (width, height), `measure`

    def tile_limit(self, entry: DatasetEntry | None, num_images: int) -> int:
        """Most tiles one image of this record may use (per-dataset override, multi-image budget)."""
        s = self.settings
        if not s.dynamic_image_size:
            return 1
        max_patch = entry.max_dynamic_patch if entry and entry.max_dynamic_patch else s.max_dynamic_patch
        return tiles_budget(max_patch, num_images)

    def __call__(
        self,
        record: dict[str, Any],
        where: str,
        entry: DatasetEntry | None,
        rng: random.Random,
        *,
        load_pixels: bool = True,
    ) -> dict[str, Any]:
        """Build one sample.

        Returns:
            A dict with `input_ids` and `labels` (LongTensor [T]), `position_ids` [T] (the method below), `pixel_values`
            (FloatTensor [N, 3, S, S], or None for text), `num_tiles` (tiles per image, or per frame),
            `num_image_tokens`, `num_text_tokens`, `truncated` (text was cut to max_seq_length) and `where`. With
            `load_pixels=False` images are decoded and measured but not transformed, and `pixel_values` is None (for
            the data checker).
        """
        media = self.expand(record_to_conversation(record, where), where, entry, rng, load_pixels=load_pixels)
        input_ids, labels, truncated = self.tokenize(media.messages, where, media.num_image_tokens)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": self.position_ids(input_ids, self.image_strides(len(media.num_tiles), rng)),
            "pixel_values": media.pixel_values,
            "num_tiles": media.num_tiles,
            "num_image_tokens": media.num_image_tokens,
            "num_text_tokens": len(input_ids) - media.num_image_tokens,
            "truncated": truncated,
            "where": where,
        }

    def measure(self, record: dict[str, Any], where: str, entry: DatasetEntry | None) -> tuple[int, int]:
        """(tokens, tiles) of the sample `record` becomes, from image headers and the tokenizer, without decoding
        pixels: what packing and length-grouped batching plan with.

        Exact for text and images. A video counts `max_num_frame` frames, the most it can get (the frames drawn
        depend on the epoch), so a planned row never overflows. Raises DataError as building the sample would.
        """
        media = self.expand(record_to_conversation(record, where), where, entry, None, load_pixels=False, decode=False)
        input_ids, _, _ = self.tokenize(media.messages, where, media.num_image_tokens)
        return len(input_ids), sum(media.num_tiles)

    def expand(
        self,
        conversation: Conversation,
        where: str,
        entry: DatasetEntry | None,
        rng: random.Random | None,
        *,
        load_pixels: bool = True,
        decode: bool = True,
    ) -> ExpandedMedia:
        """Load and tile the conversation's images or video frames; expand their placeholders in the user turns.

        With `load_pixels=False` the images are decoded and measured but not transformed; with `decode=False` too, only
        their headers are read, and a video counts `max_num_frame` frames without being opened (`measure`)."""
        s = self.settings
        messages = [dict(m) for m in conversation.messages]
        resolve = entry.resolve if entry else (lambda p: p)
        tiles: list = []
        num_tiles_per_image: list[int] = []
        if conversation.images:
            limit = self.tile_limit(entry, len(conversation.images))
            for path in conversation.images:
                if not load_pixels and not decode and not isinstance(path, Image.Image):
                    width, height = self._header_size(entry, path, where)
                    num_tiles_per_image.append(self._count_tiles(_Size(width, height), limit))
                    continue
                image = path if isinstance(path, Image.Image) else _load(load_image, resolve(path), where)
                if load_pixels:
                    image_tiles = self._tile(image, limit)
                    tiles += image_tiles
                    num_tiles_per_image.append(len(image_tiles))
                else:
                    num_tiles_per_image.append(self._count_tiles(image, limit))
            spans = iter(image_token_span(s.num_image_token, n) for n in num_tiles_per_image)
            for m in messages:
                if m["role"] == "user":
                    parts = m["content"].split(IMAGE_PLACEHOLDER)
                    m["content"] = parts[0] + "".join(next(spans) + part for part in parts[1:])
        elif conversation.video is not None:
            if decode:
                frames = _load(
                    lambda p: read_video_frames(
                        p, s.min_num_frame, s.max_num_frame, sample=s.video_sample, clip=conversation.clip, rng=rng
                    ),
                    resolve(conversation.video),
                    where,
                )
                if load_pixels:
                    tiles = frames
                num_frames = len(frames)
            else:
                num_frames = s.max_num_frame  # the most frames a sample of this video can get
            num_tiles_per_image = [1] * num_frames
            prompt = video_prompt(num_frames)
            for m in messages:
                if VIDEO_PLACEHOLDER in m["content"]:
                    content = m["content"].replace(VIDEO_PLACEHOLDER + "\n", prompt)
                    m["content"] = content.replace(VIDEO_PLACEHOLDER, prompt.rstrip("\n"))
                    m["content"] = m["content"].replace(IMAGE_PLACEHOLDER, image_token_span(s.num_image_token, 1))
        pixel_values = None
        if load_pixels and tiles:
            data_augment = entry.data_augment if entry else False
            transform = ImageTransform(s.image_size, s.normalize_type, data_augment, s.pad2square)
            pixel_values = torch.stack([transform(tile, rng) for tile in tiles])
        return ExpandedMedia(messages, pixel_values, num_tiles_per_image, sum(num_tiles_per_image) * s.num_image_token)

    def image_strides(self, num_images: int, rng: random.Random | None) -> list[int]:
        """The V2PE stride of each image (or video frame), data/v2pe.py: `v2pe_stride` for each in fixed mode, drawn
        from the sample's `rng` in random mode (after its augmentation and frames, which are drawn first and so stay
        as without V2PE); none when V2PE is off."""
        s = self.settings
        if s.v2pe == "off":
            return []
        if s.v2pe == "fixed":
            return [s.v2pe_stride] * num_images
        assert rng is not None, "v2pe=random draws its strides from the sample's random stream"
        return draw_strides(rng, num_images, s.num_image_token)

    def position_ids(self, input_ids: list[int], strides: list[int]) -> torch.Tensor:
        """Position ids [T] of a sequence: 0, 1, 2, ... (long) with V2PE off, else the V2PE positions (float32) of its
        images' `strides` (`image_strides`). They travel with the sample: collators and generation use them as
        they are."""
        if self.settings.v2pe == "off":
            return torch.arange(len(input_ids))
        return v2pe_position_ids(
            input_ids,
            strides,
            tokens_per_tile=self.settings.num_image_token,
            img_start_id=self.img_start_id,
            img_end_id=self.img_end_id,
        )

    def tokenize(
        self, messages: list[dict[str, str]], where: str, num_image_tokens: int
    ) -> tuple[list[int], list[int], bool]:
        """Template-render and tokenize expanded messages; apply `max_seq_length` (text may be cut, images not).

        Returns:
            (input_ids, labels, truncated).
        """
        return next(self.tokenize_each([messages], where, num_image_tokens))

    def tokenize_each(
        self, conversations: list[list[dict[str, str]]], where: str, num_image_tokens: int
    ) -> Iterator[tuple[list[int], list[int], bool]]:
        """`tokenize` of each of a record's conversations (the two of a preference pair), in order, their texts
        tokenized in one call (`tokenize_conversations`); each one's errors are raised when it is reached."""
        s = self.settings
        each = tokenize_conversations(
            self.tokenizer, self.template, conversations, system_message=s.system_message, memo=self._token_memo
        )
        while True:
            try:
                tokenized = next(each)
            except StopIteration:
                return
            except DataError as e:
                raise DataError(f"{where}: {e}", "template mismatch") from e
            yield self._cut(tokenized.input_ids, tokenized.labels, where, num_image_tokens)

    def _cut(
        self, input_ids: list[int], labels: list[int], where: str, num_image_tokens: int
    ) -> tuple[list[int], list[int], bool]:
        """Apply `max_seq_length` to a tokenized sample: (input_ids, labels, truncated)."""
        s = self.settings
        truncated = False
        if len(input_ids) > s.max_seq_length:
            kept = input_ids[: s.max_seq_length]
            if kept.count(self.img_context_id) < num_image_tokens or input_ids.count(self.img_end_id) != kept.count(
                self.img_end_id
            ):
                raise DataError(
                    f"{where}: image tokens would be cut by max_seq_length={s.max_seq_length}: the sample needs "
                    f"{len(input_ids)} tokens, {num_image_tokens} of them image tokens "
                    f"({num_image_tokens // s.num_image_token} tiles); raise max_seq_length or lower max_dynamic_patch",
                    "image tokens cut",
                )
            input_ids, labels, truncated = kept, labels[: s.max_seq_length], True
        if labels.count(IGNORE_INDEX) == len(labels):  # no trained token
            reason = "after truncation to max_seq_length" if truncated else "(no answer text)"
            raise DataError(f"{where}: the sample has no trained tokens {reason}", "no trained tokens")
        return input_ids, labels, truncated

    def _header_size(self, entry: DatasetEntry | None, path: str, where: str) -> tuple[int, int]:
        """(width, height) of a record's image from its header, remembered for the next records that name it (records
        about one image often come together); an unreadable one raises each time."""
        key = (entry.root if entry else "", path)
        if (size := self._image_sizes.get(key)) is None:
            size = _load(image_size, entry.resolve(path) if entry else path, where)
            if len(self._image_sizes) >= IMAGE_SIZES_REMEMBERED:
                self._image_sizes.clear()  # a bound, cheaper than keeping the most recent
            self._image_sizes[key] = size
        return size

    def _tile(self, image, limit: int) -> list:
        s = self.settings
        if not s.dynamic_image_size:
            return [image]
        return dynamic_preprocess(image, s.min_dynamic_patch, limit, s.image_size, s.use_thumbnail)

    def _count_tiles(self, image, limit: int) -> int:
        s = self.settings
        if not s.dynamic_image_size:
            return 1
        return num_tiles(image.width, image.height, s.min_dynamic_patch, limit, s.image_size, s.use_thumbnail)


@dataclass
class _Size:
    """An image's size without its pixels (`_count_tiles` reads width and height only)."""

    width: int
    height: int


def _load(loader, path: str, where: str):
    try:
        return loader(path)
    except DataError as e:
        raise DataError(f"{where}: {e}", "unreadable media") from e
