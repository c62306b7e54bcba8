"""Resumable generation into an append-only JSONL file: what `sample`, `dropout-ntp` and `eval` share, with the
input lines they read (`image_list`, and `check_prompt_line` for the prompt lines of `sample` and `eval`).

A run reads its input lines, keys each one (`sample`: image + question; `dropout-ntp`: image + question + chosen),
counts the output lines each key has already, and asks the backend only for the rest. A request's lines are
appended in one write, flushed and synced as soon as it completes, so a stopped run loses at most the requests in
flight, and the next run continues where it stopped without duplicating or losing a line. A crash in the middle of
a write leaves a torn last line: it is cut off (with a warning) before anything is counted.

Worked example (n = 4): a run stopped after writing 4 lines for prompt A and 1 for prompt B (and half of a second
one, torn). The next run cuts the torn half, counts A: 4, B: 1, and samples 3 more for B and 4 for C. B's new
draws get a seed derived from (seed, B's key, 1), not the first draw's (seed, B's key, 0), so a seeded backend does
not repeat the text B already has.

Sharding: process k of N takes input lines k, k+N, k+2N, ... and writes `<stem>.shard-k-of-N<suffix>`, so no two
processes append to one file; a key lives in one shard, and the counts are read from every output file of the
input (the unsharded one and all shards), so a run may be resumed with another number of shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from internvl_tune.constants import IMAGE_PLACEHOLDER
from internvl_tune.data.errors import DataError
from internvl_tune.errors import UserError
from internvl_tune.generation.base import Backend, GenerationRequest

logger = logging.getLogger(__name__)


def select_indices(num_lines: int, *, max_num: int | None = None, start: int = 0) -> list[int]:
    """The input lines to use: all of them, or with `max_num` an evenly spaced subset, as the original
    `--sample-max-num` / `--sample-start-idx` take it (`lines[start::len // max_num][:max_num]`).

    Example: `select_indices(10, max_num=3, start=1) == [1, 4, 7]`.
    """
    indices = list(range(num_lines))
    if max_num is not None and num_lines > max_num:
        indices = indices[start :: num_lines // max_num][:max_num]
    return indices


def shard_from_env() -> tuple[int, int]:
    """`(shard index, number of shards)` from a torchrun / accelerate launch (`RANK`, `WORLD_SIZE`), else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def output_path(output_dir: str | Path, input_file: str | Path, shard_index: int = 0, num_shards: int = 1) -> Path:
    """Where a run writes the outputs for `input_file`: the input's own file name (the name keeps what the judge and
    the prompt language read from it), or `<stem>.shard-k-of-N<suffix>` for a shard."""
    if not 0 <= shard_index < num_shards:
        raise UserError(f"need 0 <= shard index < number of shards, got {shard_index} and {num_shards}")
    name = Path(input_file).name
    if num_shards > 1:
        path = Path(name)
        name = f"{path.stem}.shard-{shard_index}-of-{num_shards}{path.suffix}"
    return Path(output_dir) / name


def existing_outputs(output_dir: str | Path, input_file: str | Path) -> list[Path]:
    """Every output file a run for `input_file` may have written into `output_dir`, with any number of shards."""
    name = Path(input_file)
    pattern = re.compile(re.escape(name.stem) + r"\.shard-\d+-of-\d+" + re.escape(name.suffix))
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name == name.name or pattern.fullmatch(p.name))


def repair_tail(path: Path) -> int:
    """Cut a torn last line left by a crash during a write: a last line without its newline, or a last line that is
    not JSON (a crash can leave a line's bytes unwritten even behind its newline). Returns the bytes cut."""
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        size = keep = f.seek(0, os.SEEK_END)
        if size and not _read(f, size - 1, size) == b"\n":
            keep = _line_start(f, size)
        if keep:
            start = _line_start(f, keep - 1)
            line = _read(f, start, keep - 1)
            if line.strip() and not _parses(line):
                keep = start
        if keep < size:
            f.truncate(keep)
            logger.warning("%s: cut a torn last line (%d bytes) left by an interrupted run", path, size - keep)
        return size - keep


def _read(f, start: int, end: int) -> bytes:
    f.seek(start)
    return f.read(end - start)


def _line_start(f, end: int) -> int:
    """The position just after the last newline before `end` (0 if there is none), read backwards in chunks."""
    position = end
    while position > 0:
        chunk_start = max(0, position - (1 << 16))
        newline = _read(f, chunk_start, position).rfind(b"\n")
        if newline >= 0:
            return chunk_start + newline + 1
        position = chunk_start
    return 0


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def count_keys(paths: Iterable[Path], key: Callable[[dict[str, Any]], str]) -> Counter:
    """Output lines per key over the files. A torn last line is not counted: another process may be writing it, or a
    crashed shard left it (the shard's next run cuts it).

    Raises:
        DataError: a line before the last is not JSON (`file:line`).
    """
    counts: Counter = Counter()
    for path in paths:
        with open(path, "rb") as f:
            number, line = 1, f.readline()
            while line:
                following = f.readline()
                if line.strip() and line.endswith(b"\n"):  # without its newline: torn, or being written
                    try:
                        counts[key(json.loads(line))] += 1
                    except ValueError as e:
                        if following:
                            raise DataError(f"{path}:{number}: not a JSON line: {e}", "malformed JSON") from e
                number, line = number + 1, following
    return counts


def derive_seed(seed: int, *parts: Any) -> int:
    """A seed in [0, 2**31) from a base seed and a job's identity, the same in every process and Python version."""
    digest = hashlib.sha256(json.dumps([seed, *parts], ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


@dataclass
class Job:
    """One request and how its texts become output lines."""

    request: GenerationRequest
    to_records: Callable[[list[str]], list[dict[str, Any]]]


def run_jobs(backend: Backend, jobs: Sequence[Job], path: Path, *, desc: str, progress: bool = True) -> int:
    """Generate every job and append its lines to `path` as it completes; returns the lines written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    num_written = 0
    with open(path, "ab") as f, tqdm(total=len(jobs), desc=desc, unit="prompt", disable=not progress) as bar:
        for index, texts in backend.stream([job.request for job in jobs]):
            records = jobs[index].to_records(texts)
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
            f.flush()
            os.fsync(f.fileno())
            num_written += len(records)
            bar.update(1)
    return num_written


def image_list(record: dict[str, Any], where: str) -> list[str]:
    """The image paths of an input record (`image`: a path, a list of paths, or absent / null / empty)."""
    image = record.get("image")
    if not image:
        return []
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
        raise DataError(f"{where}: 'image' must be a path or a list of paths", "invalid record")
    return images


def check_prompt_line(record: dict[str, Any], where: str, root: Path) -> list[str]:
    """The image files (resolved against `root`) of a prompt line, `{"image", "question", "answer"}` as `sample` and
    `eval` read them, after checking its fields."""
    if not isinstance(record.get("question"), str) or not record["question"].strip():
        raise DataError(f"{where}: 'question' must be a non-empty string", "missing field")
    if record.get("answer") is None:
        raise DataError(
            f"{where}: 'answer' is required (the ground truth the responses are judged by)", "missing field"
        )
    images = [str(root / path) for path in image_list(record, where)]
    for path in images:
        if not Path(path).is_file():
            raise DataError(f"{where}: image {path} not found", "missing image")
    num_placeholders = record["question"].count(IMAGE_PLACEHOLDER)
    if num_placeholders and num_placeholders != len(images):
        raise DataError(
            f"{where}: {num_placeholders} <image> placeholders in the question for {len(images)} images", "image count"
        )
    return images


def record_key(record: dict[str, Any], *fields: str) -> str:
    """The identity of an input (or output) line: its images and the given fields."""
    return json.dumps([record.get("image") or None, *(record.get(f) for f in fields)], ensure_ascii=False)
