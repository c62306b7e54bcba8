"""The prompts of online RL: a meta JSON of prompt files (the `sample` prompt format: `{"image", "question",
"answer", "source"?}`), drawn in a fixed order so that a run resumes by its step count alone.

Each dataset's lines are repeated as `repeat_time` says (`meta.repeat_indices`, the one rule of every recipe); the
epoch's order is a shuffle seeded by (seed, epoch). Step s takes the next `prompts_per_step` prompts of that order
(crossing into the next epoch when one ends), and rank r of W takes every W-th of them, from the r-th: so 2 ranks
with half the prompts each draw what 1 rank draws, and a resumed run draws what the interrupted one would have. A
line is read and checked when it is drawn (`check_prompt_line`: its question, answer and images, naming
`file:line`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from internvl_tune.data.jsonl import JsonlFile
from internvl_tune.data.meta import load_meta, repeat_indices
from internvl_tune.errors import UserError
from internvl_tune.preference_data.resumable import check_prompt_line


@dataclass(frozen=True)
class Prompt:
    """One drawn prompt: its record, where it is (`file:line`), its images (resolved paths), and its place in the
    run's order (`index`: a stable id for seeds and logs)."""

    record: dict[str, Any]
    where: str
    images: list[str]
    index: int


class PromptSet:
    """The prompts of a meta JSON, in the run's order (module docstring)."""

    def __init__(self, meta_path: str | Path, *, seed: int):
        self.seed = seed
        self.entries = load_meta(meta_path, require_data_augment=False)
        self.files = [JsonlFile(entry.annotation) for entry in self.entries]
        self.lines = [
            (d, line)
            for d, (entry, file) in enumerate(zip(self.entries, self.files, strict=True))
            for line in repeat_indices(len(file), entry.repeat_time, seed)
        ]
        if not self.lines:
            raise UserError(f"{meta_path}: its prompt files hold no lines")

    def __len__(self) -> int:
        return len(self.lines)

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.lines)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def for_step(self, step: int, prompts_per_step: int, rank: int = 0, world: int = 1) -> list[Prompt]:
        """This rank's prompts of step `step` (0-based)."""
        start = step * prompts_per_step
        positions = range(start + rank, start + prompts_per_step, world)
        orders: dict[int, list[int]] = {}
        prompts = []
        for position in positions:
            epoch, offset = divmod(position, len(self.lines))
            order = orders.setdefault(epoch, self._order(epoch))
            dataset, line = self.lines[order[offset]]
            record, where = self.files[dataset][line]
            images = check_prompt_line(record, where, Path(self.entries[dataset].root))
            prompts.append(Prompt(record, where, images, position))
        return prompts

    def epoch_of(self, step: int, prompts_per_step: int) -> float:
        """Data position in epochs after `step` steps."""
        return step * prompts_per_step / len(self.lines)
