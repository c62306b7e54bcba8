"""Token and tile counts of every sample of a dataset, without decoding images, cached beside the data.

Packing and length-grouped batching plan with `(tokens, tiles)` per sample. They come from `measure` of the sample
builder (`SampleBuilder.measure`, `PairBuilder.measure`): the record is validated, rendered and tokenized as for
training, but images only have their headers read (their size gives the tile count) and a video counts its most
frames. The counts of one annotation file are cached in `.internvl_tune_cache/` next to it (in
`~/.cache/internvl_tune/lengths/` when that folder is read-only), under a key made of the file's bytes, the
sample settings, the tokenizer's vocabulary and the dataset's root and tile limit: editing any of them measures the
file again. The cache file is written whole or not at all.

Measuring is split twice: across the ranks of a run (rank r of W measures the r-th contiguous W-th of each file not
yet cached) and, in each rank, across a pool of `workers` processes, each of which gets the measuring function once
(its initializer) and then only spans of lines to read (path, byte offset, line number, count). The ranks' parts are
gathered (`gather`), every rank ends with the same counts, and rank 0 alone writes the cache. Counts are the same
whatever the split: each record is measured by the same function, in the same way.

The counts are an `int32` array `[num_samples, 2]` (tokens, tiles; 8 bytes per sample); a record skipped as bad has
`SKIPPED` in both columns and its message in `problems`.

An image replaced by one of another size under the same name is not seen by the key (hashing every image would cost
more than measuring); the packed collator checks each built sample against its planned length and stops with an error
that names the cache to delete.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from internvl_tune.atomic import atomic_write_bytes
from internvl_tune.data.errors import DataError
from internvl_tune.data.jsonl import read_span
from internvl_tune.digests import hash_files, user_cache_dir

logger = logging.getLogger(__name__)

# 2: counts as an .npz of int32 (tokens, tiles) with bad records' messages beside them (1 was a JSON list); a version
# 1 file has another name, so it is measured again, never misread.
CACHE_VERSION = 2
SKIPPED = -1  # tokens and tiles of a record skipped as bad
# Lines per task sent to a worker: large enough that sending a task costs nothing next to measuring it, small enough
# that the workers finish together and the progress bar moves.
MAX_CHUNK = 1024
Measure = Callable[[dict[str, Any], str, Any], tuple[int, int]]
Gather = Callable[[Any], list[Any]]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's class, vocabulary and special tokens (what token counts depend on)."""
    payload = json.dumps(
        [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens],
        ensure_ascii=False,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def as_length_array(lengths) -> np.ndarray:
    """`[N, 2]` int32 counts from what `dataset_lengths` returns, or from a list of `(tokens, tiles)` or None (skipped),
    as tests and callers spell them."""
    if isinstance(lengths, np.ndarray):
        return lengths.astype(np.int32, copy=False).reshape(-1, 2)
    return np.array([(SKIPPED, SKIPPED) if n is None else n for n in lengths], dtype=np.int32).reshape(-1, 2)


def measure_workers(setting: int | None) -> int:
    """Measuring processes per rank: `data.measure_workers`, or, when it is None, the cores this process may run on
    shared by the ranks of its machine (`LOCAL_WORLD_SIZE`, as torchrun and accelerate set it), at least 1."""
    if setting is not None:
        return setting
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def cache_paths(annotation: Path, key: str) -> list[Path]:
    """Where the counts of `annotation` under `key` are looked for, in order (beside the data, then the user cache)."""
    name = f"lengths-{annotation.name}-{key}.npz"
    return [annotation.parent / ".internvl_tune_cache" / name, user_cache_dir("lengths") / name]


def one_process(value: Any) -> list[Any]:
    """The `gather` of a run of one process."""
    return [value]


def dataset_lengths(
    dataset,
    measure: Measure,
    *,
    settings_fingerprint: str,
    skip_bad: bool,
    progress: bool = True,
    problems: dict[int, str] | None = None,
    workers: int = 1,
    rank: int = 0,
    world: int = 1,
    gather: Gather = one_process,
    start_method: str | None = None,
) -> np.ndarray:
    """`[len(dataset), 2]` int32 `(tokens, tiles)` of each index of a `RecordDataset`; `SKIPPED` for a record skipped
    as bad (`skip_bad`), whose message goes into `problems` (index -> message) when it is given.

    Args:
        workers: measuring processes of this rank (0 or 1: in this process).
        rank, world, gather: this rank, the number of ranks, and a function that returns every rank's value of its
            argument, in rank order (an all-gather); every rank must call this function together.
        start_method: the pool's multiprocessing start method (default: fork where there is one, else spawn).

    Raises:
        DataError: the first bad record (in file order), naming its file:line, unless `skip_bad`. Every rank raises
            the same one.
    """
    keys = [
        _cache_key(entry, file, settings_fingerprint)
        for entry, file in zip(dataset.entries, dataset.files, strict=True)
    ]
    cached: dict[int, tuple[np.ndarray, dict[int, str]]] = {}
    for d, (file, key) in enumerate(zip(dataset.files, keys, strict=True)):
        if (found := _read_cache(cache_paths(file.path, key), len(file))) is not None:
            cached[d] = found
    # Rank 0's cache decides what is measured (ranks on other machines may see other folders); what it has and another
    # rank lacks comes with the gather.
    missing_per_rank = gather(sorted(set(range(len(dataset.files))) - set(cached)))
    to_measure = missing_per_rank[0]
    wanted = {d for other in missing_per_rank[1:] for d in other} - set(to_measure)
    parts = _measure_share(dataset, measure, to_measure, rank, world, workers, skip_bad, progress, start_method)
    shared = {d: cached[d] for d in wanted} if rank == 0 else {}
    everyone = gather((parts, shared))
    cached.update({d: value for d, value in everyone[0][1].items() if d not in cached})

    first_error = None
    for d in to_measure:
        counts, messages = [], {}
        for rank_parts, _ in everyone:
            start, part_counts, part_messages, error = rank_parts[d]
            counts.append(part_counts)
            messages |= part_messages
            if error is not None and first_error is None and not skip_bad:
                first_error = error
        if first_error is not None:
            break  # the first bad record of this file, in file order: lower ranks hold the lower lines
        cached[d] = (np.concatenate(counts), messages)
        if rank == 0:
            _write_cache(cache_paths(dataset.files[d].path, keys[d]), *cached[d])
    if first_error is not None:
        message, kind = first_error
        raise DataError(message, kind)
    if not skip_bad:
        for d in range(len(dataset.files)):
            if cached[d][1]:
                line = min(cached[d][1])
                raise DataError(cached[d][1][line], "bad record")  # a cache written by a skipping run
    return _per_index(dataset, cached, problems)


def _per_index(dataset, per_file: dict[int, tuple[np.ndarray, dict[int, str]]], problems: dict[int, str] | None):
    """Counts of each dataset index (a line repeated by `repeat_time` once per repetition)."""
    files, lines = dataset.index_arrays()
    lengths = np.empty((len(lines), 2), dtype=np.int32)
    for d, (counts, messages) in per_file.items():
        at = np.flatnonzero(files == d)
        lengths[at] = counts[lines[at]]
        if messages and problems is not None:
            bad = np.flatnonzero(lengths[at, 0] == SKIPPED)
            for index in at[bad].tolist():
                problems[index] = messages[int(lines[index])]
    return lengths


def _cache_key(entry, file, settings_fingerprint: str) -> str:
    key_payload = [CACHE_VERSION, hash_files([file.path]), settings_fingerprint, entry.root, entry.max_dynamic_patch]
    return hashlib.sha256(json.dumps(key_payload).encode()).hexdigest()[:20]


def _read_cache(paths: list[Path], num_lines: int) -> tuple[np.ndarray, dict[int, str]] | None:
    for path in paths:
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as data:
                counts = data["counts"]
                messages = json.loads(data["messages"].tobytes().decode())
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            continue  # unreadable: measure again
        if counts.shape == (num_lines, 2) and counts.dtype == np.int32:
            return counts, {int(line): message for line, message in messages.items()}
    return None


def _write_cache(paths: list[Path], counts: np.ndarray, messages: dict[int, str]) -> None:
    buffer = io.BytesIO()
    encoded = np.frombuffer(json.dumps(messages).encode(), dtype=np.uint8)
    np.savez(buffer, counts=counts, messages=encoded)
    for path in paths:
        try:
            atomic_write_bytes(path, buffer.getvalue())
            logger.info("wrote the length cache %s", path)
            return
        except OSError:
            continue  # a read-only data folder: try the user cache
    logger.warning("could not write the length cache (tried %s)", ", ".join(map(str, paths)))


def _measure_share(
    dataset, measure, files: list[int], rank, world, workers, skip_bad, progress, start_method
) -> dict[int, tuple]:
    """This rank's contiguous part of each file in `files`: {file: (first line, counts, messages, first error)},
    measured in order, stopping at the first bad record unless `skip_bad`."""
    spans = {}
    for d in files:
        n = len(dataset.files[d])
        spans[d] = (n * rank // world, n * (rank + 1) // world)
    total = sum(stop - start for start, stop in spans.values())
    tasks = []
    chunk = chunk_size(total, workers)
    for d, (start, stop) in spans.items():
        for first in range(start, stop, chunk):
            offset, line_number = dataset.files[d].span(first)
            tasks.append((d, first, str(dataset.files[d].path), offset, line_number, min(chunk, stop - first)))
    results: dict[int, tuple] = {d: (start, [], {}, None) for d, (start, _) in spans.items()}
    if not tasks:
        return {d: (start, np.empty((0, 2), np.int32), {}, None) for d, (start, _) in spans.items()}
    began = time.perf_counter()
    bar = tqdm(total=total, desc="measuring sample lengths", disable=not progress, unit="rec")
    context = (measure, dataset.entries, skip_bad)
    with span_results(_measure_chunk, context, tasks, workers, start_method) as chunks:
        for (d, *_), (counts, messages, error) in zip(tasks, chunks, strict=False):  # stops at a bad record
            bar.update(len(counts))
            results[d][1].append(counts)
            results[d][2].update(messages)
            if error is not None and not skip_bad:
                results[d] = (*results[d][:3], error)
                break  # the rank stops at its first bad record; the gather still happens
    bar.close()
    elapsed = time.perf_counter() - began
    logger.info(
        "measured %d sample lengths in %.1f s (%.0f records/s, %d worker%s%s)",
        total,
        elapsed,
        total / max(elapsed, 1e-9),
        max(1, workers),
        "" if workers <= 1 else "s",
        f", rank {rank} of {world}" if world > 1 else "",
    )
    return {
        d: (start, np.array(np.concatenate(counts) if counts else np.empty((0, 2)), np.int32), messages, error)
        for d, (start, counts, messages, error) in results.items()
    }


class span_results:
    """Context manager yielding `work(context, task)` of each task, in task order, from a pool of `workers` processes
    or, for 0 or 1, from this process. `work` is a module-level function; `context` reaches each worker once (its
    initializer: inherited under fork, pickled under spawn), and the tasks are small (spans of lines, never records).
    Leaving the block stops the pool, with any task still queued."""

    def __init__(self, work, context, tasks, workers: int, start_method: str | None = None):
        self.work, self.context, self.tasks, self.workers, self.start_method = (
            work,
            context,
            tasks,
            workers,
            start_method,
        )
        self.pool = None
        self.in_process = None

    def __enter__(self) -> Iterator:
        if self.workers <= 1:
            self.in_process = self._in_process()
            return self.in_process
        method = self.start_method or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        self.pool = multiprocessing.get_context(method).Pool(
            min(self.workers, len(self.tasks)), initializer=_init_worker, initargs=(self.work, self.context)
        )
        return self.pool.imap(_run_in_worker, self.tasks)

    def _in_process(self) -> Iterator:
        # One worker means one core: the tokenizer's threads (a pair's two conversations go in one batched call)
        # cost more than they give on calls this small, and 2 workers would race them for the same cores. The
        # variable is read at each call, so it is set for the measuring only and put back after.
        previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            for task in self.tasks:
                yield self.work(self.context, task)
        finally:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous

    def __exit__(self, *exc) -> None:
        if self.in_process is not None:
            self.in_process.close()  # its `finally` puts the variable back, even when the caller stopped early
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def chunk_size(total: int, workers: int) -> int:
    """Lines per task: about 4 tasks per worker (they finish together), at most `MAX_CHUNK`."""
    return max(1, min(MAX_CHUNK, math.ceil(total / max(1, 4 * workers))))


_worker = None


def _init_worker(work, context) -> None:
    """A worker's start: the work and its context (the measuring function: its builder and tokenizer) arrive once."""
    global _worker
    worker_signals()
    # The pool's processes are the parallelism; the tokenizer's own threads would only compete for the same cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = (work, context)


def worker_signals() -> None:
    """A forked pool worker inherits the run's SIGTERM handler (save at the end of the step), so the pool's terminate
    would not stop it and the pool's join would wait for ever: it takes the default back; Ctrl-C is the main
    process's to handle (it stops the pool)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_in_worker(task):
    work, context = _worker
    return work(context, task)


def _measure_chunk(context, task) -> tuple[np.ndarray, dict[int, str], tuple[str, str] | None]:
    """Counts of `count` lines from `first` on: `(counts [n, 2], {line: message} of bad records, first error as
    (message, kind))`; without `skip_bad` it stops after the first bad record."""
    measure, entries, skip_bad = context
    d, first, path, offset, line_number, count = task
    entry = entries[d]
    counts = np.empty((count, 2), dtype=np.int32)
    messages: dict[int, str] = {}
    error = None
    for i, item in enumerate(read_span(Path(path), offset, line_number, count)):
        try:
            if isinstance(item, DataError):
                raise item
            counts[i] = measure(item[0], item[1], entry)
        except DataError as e:
            counts[i] = SKIPPED
            messages[first + i] = str(e)
            if error is None:
                error = (str(e), e.kind)
            if not skip_bad:
                return counts[: i + 1], messages, error
    return counts, messages, error
