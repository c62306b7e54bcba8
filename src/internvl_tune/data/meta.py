"""The InternVL meta JSON: which annotation files to read, from where, and how often
(docs/original-differences.md §2.1, §2.2).

This module is the one place that owns `repeat_time`, for SFT and preference data alike.

Example meta JSON::

    {
      "shapes_train": {
        "root": "images/",
        "annotation": "train.jsonl",
        "data_augment": false,
        "repeat_time": 2.5,
        "max_dynamic_patch": 6,
        "length": 1000
      }
    }

Relative `root` and `annotation` paths are resolved against the folder of the meta file, so a dataset folder
can be moved as a whole (the original resolves them against the working directory; absolute paths behave the
same in both).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from internvl_tune.data.errors import DataError


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a meta JSON file."""

    name: str
    root: str
    annotation: Path
    data_augment: bool
    repeat_time: float
    max_dynamic_patch: int | None = None
    length: int | None = None

    def resolve(self, path: str) -> str:
        """The full path of a media file named in a record (`s3://` roots are joined by concatenation)."""
        if self.root.startswith("s3://"):
            return self.root + path
        return str(Path(self.root) / path)


def load_meta(path: str | Path, *, require_data_augment: bool = True) -> list[DatasetEntry]:
    """Read and validate a meta JSON file.

    Args:
        path: the meta JSON.
        require_data_augment: the original SFT entry requires `data_augment` in every entry; preference data
            (MMPR) omits it, and it then defaults to False.

    Raises:
        DataError: naming the file and the entry, for a missing file, invalid JSON, or a bad field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: meta file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON in meta file: {e.msg}") from e
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: a meta file must be a non-empty JSON object of datasets")

    entries = []
    for name, spec in raw.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(spec, dict):
            raise DataError(f"{where}: must be an object")
        for key in ("root", "annotation"):
            if not isinstance(spec.get(key), str):
                raise DataError(f"{where}: field {key!r} is required and must be a string")
        if not spec["annotation"].endswith(".jsonl"):
            raise DataError(f"{where}: 'annotation' must be a .jsonl file, got {spec['annotation']!r}")
        if "data_augment" not in spec and require_data_augment:
            raise DataError(f"{where}: field 'data_augment' (true or false) is required for SFT data")
        data_augment = spec.get("data_augment", False)
        if not isinstance(data_augment, bool):
            raise DataError(f"{where}: 'data_augment' must be true or false, got {data_augment!r}")
        repeat_time = spec.get("repeat_time", 1)
        if isinstance(repeat_time, bool) or not isinstance(repeat_time, (int, float)) or not repeat_time > 0:
            raise DataError(f"{where}: 'repeat_time' must be a number > 0, got {repeat_time!r}")
        max_dynamic_patch = spec.get("max_dynamic_patch")
        if max_dynamic_patch is not None and (not isinstance(max_dynamic_patch, int) or max_dynamic_patch < 1):
            raise DataError(f"{where}: 'max_dynamic_patch' must be an integer >= 1, got {max_dynamic_patch!r}")
        root = spec["root"]
        if not root.startswith("s3://") and not Path(root).is_absolute():
            root = str(path.parent / root)
        annotation = Path(spec["annotation"])
        if not annotation.is_absolute():
            annotation = path.parent / annotation
        if not annotation.is_file():
            raise DataError(f"{where}: annotation file {annotation} not found")
        entries.append(
            DatasetEntry(
                name=name,
                root=root,
                annotation=annotation,
                data_augment=data_augment,
                repeat_time=float(repeat_time),
                max_dynamic_patch=max_dynamic_patch,
                length=spec.get("length"),
            )
        )
    return entries


def repeat_indices(num_lines: int, repeat_time: float, seed: int) -> list[int]:
    """Line indices of one dataset after `repeat_time`, the one rule for SFT and preference data.

    The integer part repeats every line; the fractional part adds a random subset of
    `floor(frac * num_lines)` distinct lines, drawn with `seed`. So 0.5 keeps a random half, 2.0 repeats
    twice, 2.5 repeats twice plus a random half. (The original SFT entry keeps the *first* lines for r < 1
    and rejects 2.0 and 2.5; its pretrain entry floors r. Both are replaced by this rule.)

    Example:
        >>> repeat_indices(4, 2.0, seed=0)
        [0, 1, 2, 3, 0, 1, 2, 3]
        >>> len(repeat_indices(10, 0.5, seed=0)), len(repeat_indices(10, 1.5, seed=0))
        (5, 15)
    """
    return repeat_index_array(num_lines, repeat_time, seed).tolist()


def repeat_index_array(num_lines: int, repeat_time: float, seed: int) -> np.ndarray:
    """`repeat_indices` as an int64 array (8 bytes per index, no Python object per line: a dataset of millions)."""
    if repeat_time <= 0:
        raise ValueError(f"repeat_time must be > 0, got {repeat_time}")
    whole = math.floor(repeat_time)
    fraction = repeat_time - whole
    indices = np.tile(np.arange(num_lines, dtype=np.int64), whole)
    num_extra = math.floor(fraction * num_lines + 1e-9)
    if num_extra:
        extra = np.array(sorted(random.Random(seed).sample(range(num_lines), num_extra)), dtype=np.int64)
        indices = np.concatenate([indices, extra])
    return indices
