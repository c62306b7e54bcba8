"""Token and tile counts of every sample of a dataset, without decoding images, cached beside the data.

Packing and length-grouped batching plan with `(tokens, tiles)` per sample. They come from `measure` of the sample
builder (`SampleBuilder.measure`, `PairBuilder.measure`): the record is validated, rendered and tokenized as for
training, but images only have their headers read (their size gives the tile count) and a video counts its most
frames. The counts of one annotation file are cached in `.internvl_tune_cache/` next to it (in
`~/.cache/internvl_tune/lengths/` when that folder is read-only), under a key made of the file's bytes, the
sample settings, the tokenizer's vocabulary and the dataset's root and tile limit: editing any of them measures the
file again. The cache file is written whole or not at all.

An image replaced by one of another size under the same name is not seen by the key (hashing every image would cost
more than measuring); the packed collator checks each built sample against its planned length and stops with an error
that names the cache to delete.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from internvl_tune.atomic import atomic_write_text
from internvl_tune.data.errors import DataError
from internvl_tune.digests import hash_files, user_cache_dir

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
Measure = Callable[[dict[str, Any], str, Any], tuple[int, int]]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's class, vocabulary and special tokens (what token counts depend on)."""
    payload = json.dumps(
        [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cache_paths(annotation: Path, key: str) -> list[Path]:
    """Where the counts of `annotation` under `key` are looked for, in order (beside the data, then the user cache)."""
    name = f"lengths-{annotation.name}-{key}.json"
    return [annotation.parent / ".internvl_tune_cache" / name, user_cache_dir("lengths") / name]


def dataset_lengths(
    dataset,
    measure: Measure,
    *,
    settings_fingerprint: str,
    skip_bad: bool,
    progress: bool = True,
    problems: dict[int, str] | None = None,
) -> list[tuple[int, int] | None]:
    """`(tokens, tiles)` of each index of a `RecordDataset`, or None for a record skipped as bad (`skip_bad`); the
    bad records' messages go into `problems` (index -> message) when it is given.

    Raises:
        DataError: the first bad record, naming its file:line, unless `skip_bad`.
    """
    per_file = [
        _file_lengths(entry, file, measure, settings_fingerprint, skip_bad, progress)
        for entry, file in zip(dataset.entries, dataset.files, strict=True)
    ]
    lengths: list[tuple[int, int] | None] = []
    for index, (d, line) in enumerate(dataset.index):
        value = per_file[d][line]
        lengths.append(None if isinstance(value, str) else (value[0], value[1]))
        if isinstance(value, str) and problems is not None:
            problems[index] = value
    return lengths


def _file_lengths(entry, file, measure: Measure, settings_fingerprint: str, skip_bad: bool, progress: bool) -> list:
    key_payload = [CACHE_VERSION, hash_files([file.path]), settings_fingerprint, entry.root, entry.max_dynamic_patch]
    key = hashlib.sha256(json.dumps(key_payload).encode()).hexdigest()[:20]
    paths = cache_paths(file.path, key)
    for path in paths:
        if path.is_file():
            try:
                counts = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # unreadable: measure again
            if len(counts) == len(file):
                return _checked(counts, file, skip_bad)
    counts: list = []
    for line in tqdm(range(len(file)), desc=f"measuring {file.path.name}", disable=not progress, unit="rec"):
        try:
            record, where = file[line]
            counts.append(list(measure(record, where, entry)))
        except DataError as e:
            if not skip_bad:
                raise
            counts.append(str(e))
    text = json.dumps(counts)
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
            break
        except OSError:
            continue  # a read-only data folder: try the user cache
    else:
        logger.warning("could not write the length cache of %s (tried %s)", file.path, ", ".join(map(str, paths)))
    return _checked(counts, file, skip_bad)


def _checked(counts: list, file, skip_bad: bool) -> list:
    """Raise on a cached bad record unless skipping (a cache written by a skipping run holds their messages)."""
    if not skip_bad:
        bad = next((c for c in counts if isinstance(c, str)), None)
        if bad is not None:
            raise DataError(bad, "bad record")
    return counts
