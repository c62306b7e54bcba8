"""Pre-flight data check: validate every record without running the model, and report what training will see.

The report gives counts, problems by kind with `file:line`, text / image token and tile histograms, how many
samples exceed `max_seq_length`, and the padding a batch size would waste. It builds samples with the same
`SampleBuilder` as training (images are decoded and measured, not transformed), so what passes here trains.

A video is checked at the most frames it can get (`max_num_frame`; training draws between `min_num_frame` and that
each epoch), and every sample is also measured as packing and length-grouped batching measure it
(`SampleBuilder.measure`, the planner's maximum): an error there, or a sample over a packed row's budget in a run that
packs and refuses such samples, is reported with the message training stops with.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.errors import DataError
from internvl_tune.data.jsonl import read_span
from internvl_tune.data.lengths import chunk_size, span_results
from internvl_tune.data.packing import PackingSettings, fits, over_budget_error, pack
from internvl_tune.data.preference import PairBuilder
from internvl_tune.data.transform import SampleBuilder, SampleSettings


@dataclass
class DataReport:
    num_records: int = 0
    num_ok: int = 0
    per_dataset: dict[str, Counter] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    text_tokens: list[int] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    tiles: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    num_over_max_length: int = 0
    max_seq_length: int = 0
    batch_size: int = 1
    padding_waste: float = 0.0
    packing: dict[str, Any] | None = None  # what packing would do: pack_report()

    @property
    def num_errors(self) -> int:
        return sum(len(v) for v in self.problems.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_records": self.num_records,
            "num_ok": self.num_ok,
            "num_errors": self.num_errors,
            "per_dataset": {k: dict(v) for k, v in self.per_dataset.items()},
            "problems": dict(self.problems),
            "num_over_max_length": self.num_over_max_length,
            "total_text_tokens": sum(self.text_tokens),
            "total_image_tokens": sum(self.image_tokens),
            "total_tiles": sum(self.tiles),
            "padding_waste": self.padding_waste,
            "packing": self.packing,
        }

    def format(self, max_listed: int = 10) -> str:
        lines = [f"records: {self.num_records}   ok: {self.num_ok}   errors: {self.num_errors}"]
        for name, counts in self.per_dataset.items():
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            lines.append(f"  {name}: {kinds}")
        if self.problems:
            lines.append("problems:")
            for kind, wheres in sorted(self.problems.items()):
                lines.append(f"  {kind}: {len(wheres)}")
                lines += [f"    {w}" for w in wheres[:max_listed]]
                if len(wheres) > max_listed:
                    lines.append(f"    ... and {len(wheres) - max_listed} more")
        if self.lengths:
            lines.append(
                f"tokens: {sum(self.text_tokens)} text + {sum(self.image_tokens)} image = {sum(self.lengths)} "
                f"in {sum(self.tiles)} tiles"
            )
            lines += ["text tokens per sample:", *histogram(self.text_tokens)]
            lines += ["image tokens per sample:", *histogram(self.image_tokens)]
            lines += ["tiles per sample:", *histogram(self.tiles)]
            lines.append(f"samples over max_seq_length={self.max_seq_length}: {self.num_over_max_length}")
            lines.append(f"padding waste at batch size {self.batch_size} (random batches): {self.padding_waste:.1%}")
        if self.packing:
            p = self.packing
            lines.append(
                f"packing (max_packed_tokens={p['max_packed_tokens']}, num_images_expected={p['num_images_expected']}, "
                f"max_buffer_size={p['max_buffer_size']}): {p['num_samples']} samples -> {p['num_rows']} rows, "
                f"{p['samples_per_row']:.1f} per row, {p['fill_ratio']:.1%} of the token budget filled, "
                + (
                    "no sample over budget"
                    if not p["num_over_budget"]
                    else f"{p['num_over_budget']} over budget ("
                    + (
                        "packed training stops on them; data.oversize_sample=alone trains each in a row of its own)"
                        if p["oversize_sample"] == "error"
                        else "data.oversize_sample=alone: each trained in a row of its own)"
                    )
                )
            )
        return "\n".join(lines)


def histogram(values: list[int], bins: int = 8, width: int = 40) -> list[str]:
    """Text histogram lines `lo-hi  count  ####` over at most `bins` integer ranges of equal width, each holding at
    least one integer; a run of empty ranges is one line.

    Example: [1, 2, 2, 9] with bins=4: width ceil(9 / 4) = 3, so ranges 1-3, 4-6, 7-9 with counts 3, 0, 1::

                      1-3        3  ########################################
                      4-6        0
                      7-9        1  #############
    """
    if not values:
        return ["  (none)"]
    lo, hi = min(values), max(values)
    step = -(-(hi - lo + 1) // bins)  # ceil
    num_bins = (hi - lo) // step + 1
    counts = Counter((v - lo) // step for v in values)
    top = max(counts.values())
    lines, i = [], 0
    while i < num_bins:
        j = i
        while not counts[i] and j + 1 < num_bins and not counts[j + 1]:
            j += 1
        first, last = lo + i * step, min(hi, lo + (j + 1) * step - 1)
        label = str(first) if first == last else f"{first}-{last}"
        lines.append(f"  {label:>19}  {counts[i]:>7}  {'#' * round(width * counts[i] / top)}".rstrip())
        i = j + 1
    return lines


def padding_waste(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Share of padded positions when `lengths` are batched in random order, each batch padded to its longest.

    Example: lengths [2, 4] in one batch of 2 -> 8 positions, 2 of them padding -> 0.25.
    """
    order = list(lengths)
    random.Random(seed).shuffle(order)
    padded = sum(
        max(order[i : i + batch_size]) * len(order[i : i + batch_size]) for i in range(0, len(order), batch_size)
    )
    return 1.0 - sum(order) / padded if padded else 0.0


def pack_report(sizes: list[tuple[int, int]], packing: PackingSettings, seed: int = 0) -> dict[str, Any]:
    """What the packer (data/packing.py) makes of samples of these (tokens, tiles) in a random order: rows, samples
    per row, the filled share of the rows' token budget, and the samples over a budget (refused or alone).

    Example: sizes [(6, 2), (5, 1), (4, 2), (3, 0)], budgets 10 tokens / 4 tiles: rows [a c] and [b d] (module
    example of data/packing.py, in the order given; a shuffled order may pack otherwise): 18 of 20 budget tokens
    filled -> fill_ratio 0.9.
    """
    order = list(range(len(sizes)))
    random.Random(seed).shuffle(order)
    budgets = dict(max_tokens=packing.max_packed_tokens, max_tiles=packing.num_images_expected)
    over = {i for i in order if not fits(*sizes[i], **budgets)}
    items = [(i, *sizes[i]) for i in order if i not in over]
    rows = list(
        pack(
            items,
            max_tokens=packing.max_packed_tokens,
            max_tiles=packing.num_images_expected,
            max_buffer_size=packing.max_buffer_size,
        )
    )
    tokens = sum(sizes[i][0] for row in rows for i in row)
    return {
        **vars(packing),
        "num_samples": len(items),
        "num_rows": len(rows) + (len(over) if packing.oversize_sample == "alone" else 0),
        "samples_per_row": len(items) / max(1, len(rows)),
        "fill_ratio": tokens / max(1, len(rows) * packing.max_packed_tokens),
        "num_over_budget": len(over),
    }


def check_data(
    meta_path: str,
    tokenizer,
    settings: SampleSettings,
    *,
    batch_size: int = 1,
    seed: int = 42,
    pairs: bool = False,
    progress: bool = True,
    packing: PackingSettings | None = None,
    packs: bool = False,
    workers: int = 1,
    start_method: str | None = None,
) -> DataReport:
    """Validate every record of a meta file (SFT conversations, or preference pairs) and collect the report.

    For pairs, a sample's length is its longer sequence, prompt + max(chosen, rejected) (what max_seq_length
    limits), and padding and packing are estimated on shared-prefix rows, prompt + chosen + rejected. With `packing`,
    the report also says what packing with those budgets would do (`pack_report`), from the lengths training plans
    with (`measure`); with `packs` too (the run packs), a sample over budget is an error unless `oversize_sample` is
    `alone`, as in training. Records are checked in `workers` processes (0 or 1: this one), each given spans of
    lines; the report is the same for any number.
    """

    def make_builder(sample_settings: SampleSettings):
        builder = SampleBuilder(tokenizer, sample_settings)
        return PairBuilder(builder) if pairs else builder

    # Measure full lengths: a longer limit during the scan tells "over max_seq_length" apart from other errors. A
    # video draws its most frames, so what is checked is the largest sample training can build from it.
    scan = make_builder(replace(settings, max_seq_length=10**9, min_num_frame=settings.max_num_frame))
    strict = make_builder(settings)
    refuse_over_budget = packing is not None and packs and packing.oversize_sample == "error"
    budgets = dict(max_tokens=packing.max_packed_tokens, max_tiles=packing.num_images_expected) if packing else {}
    dataset = RecordDataset(meta_path, scan, seed=seed, require_data_augment=not pairs)
    report = DataReport(max_seq_length=settings.max_seq_length, batch_size=batch_size)
    row_lengths = []
    planned = []  # (tokens, tiles) as packing plans them: `measure` with the run's settings
    for entry in dataset.entries:
        report.per_dataset[entry.name] = Counter()
    total = sum(len(file) for file in dataset.files)
    chunk = chunk_size(total, workers)
    tasks = [
        (d, first, str(file.path), *file.span(first), min(chunk, len(file) - first))
        for d, file in enumerate(dataset.files)
        for first in range(0, len(file), chunk)
    ]
    context = (scan, strict, dataset.entries, pairs, settings.max_seq_length, refuse_over_budget, budgets, seed)
    bar = tqdm(total=total, desc="checking records", disable=not progress, unit="rec")
    with span_results(_check_chunk, context, tasks, workers, start_method) as chunks:
        for (d, *_), results in zip(tasks, chunks, strict=True):
            bar.update(len(results))
            counts = report.per_dataset[dataset.entries[d].name]
            for result in results:
                report.num_records += 1
                report.num_over_max_length += result.over_max_length
                if result.planned is not None:
                    planned.append(result.planned)  # a refused sample too: the packing line counts it over budget
                if result.error is not None:
                    kind, message = result.error
                    report.problems[kind].append(message)
                    counts["error"] += 1
                    continue
                report.num_ok += 1
                counts[result.category] += 1
                report.text_tokens.append(result.row - result.image_tokens)
                report.image_tokens.append(result.image_tokens)
                report.tiles.append(result.tiles)
                report.lengths.append(min(result.length, settings.max_seq_length))
                row_lengths.append(result.row)
    bar.close()
    report.padding_waste = padding_waste(row_lengths, batch_size, seed)
    if packing is not None:
        report.packing = pack_report(planned, packing, seed)
    return report


@dataclass
class _Checked:
    """What checking one record found (a worker's answer, small to send back)."""

    error: tuple[str, str] | None = None  # (kind, message)
    planned: tuple[int, int] | None = None
    over_max_length: bool = False
    category: str = "text"
    length: int = 0
    row: int = 0
    image_tokens: int = 0
    tiles: int = 0


def _check_chunk(context, task) -> list[_Checked]:
    """Check `count` records from a byte offset on (`span_results` work): each as training would build it."""
    scan, strict, entries, pairs, max_seq_length, refuse_over_budget, budgets, seed = context
    d, first, path, offset, line_number, count = task
    entry = entries[d]
    results = []
    for i, item in enumerate(read_span(Path(path), offset, line_number, count)):
        result = _Checked()
        results.append(result)
        rng = random.Random(f"{seed}-check-{d}-{first + i}")
        try:
            if isinstance(item, DataError):
                raise item
            record, where = item
            sample = scan(record, where, entry, rng, load_pixels=False)
            if pairs:
                prompt = len(sample["prompt_ids"])
                responses = (len(sample["chosen_ids"]), len(sample["rejected_ids"]))
                length, row = prompt + max(responses), prompt + sum(responses)
            else:
                length = row = len(sample["input_ids"])
            if length > max_seq_length:
                result.over_max_length = True
                strict(record, where, entry, rng, load_pixels=False)  # raises if image tokens would be cut
            tokens, tiles = strict.measure(record, where, entry)  # raises what planning the run would raise
            result.planned = (tokens, tiles)
            if refuse_over_budget and not fits(tokens, tiles, **budgets):
                raise over_budget_error(where, tokens, tiles, **budgets)
        except DataError as e:
            result.error = (e.kind, str(e))
            continue
        result.category = "image" if record.get("image") else "video" if record.get("video") else "text"
        result.length, result.row = length, row
        result.image_tokens, result.tiles = sample["num_image_tokens"], sum(sample["num_tiles"])
    return results
