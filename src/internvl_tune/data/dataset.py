"""Meta JSON -> indexed records -> samples (SFT or preference pairs), with the bad-sample policy applied."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from internvl_tune.data.errors import DataError
from internvl_tune.data.jsonl import JsonlFile
from internvl_tune.data.meta import DatasetEntry, load_meta, repeat_index_array


class RecordDataset(Dataset):
    """All datasets of a meta file as one indexable sequence (after `repeat_time`), each record turned into a
    sample by `builder(record, where, entry, rng)`: a `SampleBuilder` for SFT, a `PairBuilder` for preference data.

    Indices may exceed `len(self)`: index `epoch * len(self) + i` is sample i in that epoch, so the sampler
    alone decides the epoch and each sample's augmentation is a pure function of (seed, epoch, i), which makes
    resume exact with any number of workers.

    With `on_bad_sample="skip"` a bad record yields `{"skipped": message, "where": file:line}` instead of raising;
    the collator drops it and the recipe counts and reports it.
    """

    def __init__(
        self,
        meta_path: str | Path,
        builder: Callable[[dict[str, Any], str, DatasetEntry, random.Random], dict[str, Any]],
        *,
        seed: int = 42,
        on_bad_sample: str = "error",
        require_data_augment: bool = True,
    ):
        self.entries: list[DatasetEntry] = load_meta(meta_path, require_data_augment=require_data_augment)
        self.files = [JsonlFile(e.annotation) for e in self.entries]
        self.builder = builder
        self.seed = seed
        self.on_bad_sample = on_bad_sample
        self.index = RecordIndex(
            [
                repeat_index_array(len(file), entry.repeat_time, seed=seed + d)
                for d, (entry, file) in enumerate(zip(self.entries, self.files, strict=True))
            ]
        )
        if not len(self.index):
            raise DataError(f"{meta_path}: the datasets contain no records")

    def __len__(self) -> int:
        return len(self.index)

    def index_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(dataset of each index [N] int32, its line in that dataset's file [N] int64)."""
        return self.index.files, self.index.lines

    def where(self, index: int) -> str:
        """`file:line` of the record behind a (possibly epoch-offset) index."""
        d, line = self.index[index % len(self.index)]
        return self.files[d].where(line)

    def record(self, i: int) -> tuple[dict[str, Any], str, DatasetEntry]:
        d, line = self.index[i % len(self.index)]
        record, where = self.files[d][line]
        return record, where, self.entries[d]

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch, i = divmod(index, len(self.index))
        rng = random.Random(f"{self.seed}-{epoch}-{i}")
        d, line = self.index[i]
        try:
            record, where, entry = self.record(i)
            return self.builder(record, where, entry, rng)
        except DataError as e:
            if self.on_bad_sample != "skip":
                raise
            return {"skipped": str(e), "where": self.files[d].where(line)}


class RecordIndex:
    """Index -> (dataset, line) as two arrays: 12 bytes per index, shared by forked data-loader workers without being
    copied (a list of tuples costs about 100 bytes per index, and every worker's reads of it touch reference counts,
    which copies its pages)."""

    def __init__(self, lines_per_dataset: list[np.ndarray]):
        self.files = np.concatenate(
            [np.full(len(lines), d, dtype=np.int32) for d, lines in enumerate(lines_per_dataset)]
            or [np.empty(0, np.int32)]
        )
        self.lines = np.concatenate(lines_per_dataset or [np.empty(0, np.int64)])

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return int(self.files[i]), int(self.lines[i])

    @property
    def nbytes(self) -> int:
        return self.files.nbytes + self.lines.nbytes
