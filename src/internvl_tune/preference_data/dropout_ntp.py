"""`internvl-tune dropout-ntp`: rejected answers for open-ended questions (Dropout Next-Token Prediction).

For data without a ground truth to judge by, the InternVL papers make the rejected answer by letting the model
finish the chosen answer without seeing the image: the first half of the chosen answer is kept and the rest is
what the model guesses from the text alone, so it drifts into hallucination where the image mattered.

Input: a preference JSONL with at least `{"question", "chosen"}` and usually `"image"`. For each line the prefix is
the first `int(num_words * start_ratio)` of the chosen answer's space-split words, joined by spaces; the model is
asked the question with its `<image>` placeholders removed and no image, with the prefix as the start of its
answer, and `rejected = prefix + continuation` (no separator: the continuation brings its own leading space).
Worked example (start_ratio 0.5)::

    question "<image>\\nDescribe the image."   chosen "A red circle on a white background."  (7 words)
    prefix   "A red circle"                    the model sees "Describe the image." and the answer "A red circle"
    continuation " and a blue square."  ->  rejected "A red circle and a blue square."

Output: `<output_dir>/<input file name>`, the input line plus `rejected` (a line's own `rejected` is replaced), and
`<output_dir>/<input stem>_meta.json` for `internvl-tune mpo`. Lines are keyed by image + question + chosen; the run
is resumable and shardable like `sample` (resumable.py). A continuation that makes rejected equal chosen is not
written (a pair must differ).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from internvl_tune.atomic import atomic_write_text
from internvl_tune.data.errors import DataError
from internvl_tune.data.jsonl import JsonlFile
from internvl_tune.data.placeholders import remove_image_placeholders
from internvl_tune.errors import UserError
from internvl_tune.generation.base import Backend, GenerationRequest, SamplingParams
from internvl_tune.preference_data.resumable import (
    Job,
    count_keys,
    derive_seed,
    existing_outputs,
    output_path,
    record_key,
    repair_tail,
    run_jobs,
    select_indices,
)
from internvl_tune.preference_data.sample import RunSummary

logger = logging.getLogger(__name__)

# The original pipeline's defaults: one rejected answer per line.
DEFAULT_SAMPLING = SamplingParams(n=1, temperature=0.7, top_k=50, top_p=1.0, max_new_tokens=2048, seed=0)


def answer_prefix(chosen: str, start_ratio: float) -> str:
    """The first `int(num_words * start_ratio)` space-split words of `chosen`, joined by spaces.

    Example: `answer_prefix("A red circle on a white background.", 0.5) == "A red circle"`.
    """
    words = chosen.split(" ")
    return " ".join(words[: int(len(words) * start_ratio)]).strip()


def dropout_ntp(
    backend: Backend,
    pair_file: str | Path,
    output_dir: str | Path,
    *,
    start_ratio: float = 0.5,
    params: SamplingParams = DEFAULT_SAMPLING,
    image_root: str | Path | None = None,
    sample_max_num: int | None = None,
    sample_start_idx: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    progress: bool = True,
) -> RunSummary:
    """Write `params.n` rejected answers for every line of `pair_file` that has fewer, and the meta JSON.

    Args:
        backend: the model (`HFBackend`, or a `ServerBackend` whose server continues a last assistant message).
        pair_file: the input JSONL (`question`, `chosen`, optional `image`).
        output_dir: where the output JSONL and its meta JSON go.
        start_ratio: the share of the chosen answer's words kept as the prefix, in [0, 1).
        params: sampling parameters (`n`: rejected answers per line; `seed`: the run's base seed).
        image_root: the folder image paths are relative to (default: the input file's folder); the meta JSON's
            `root`. No image is read.
        sample_max_num, sample_start_idx, shard_index, num_shards, progress: as for `sample_responses`.

    Raises:
        DataError: a line without a question or a chosen answer (`file:line`).
    """
    if not 0 <= start_ratio < 1:
        raise UserError(f"start_ratio must be in [0, 1), got {start_ratio}")
    pairs = JsonlFile(pair_file)
    root = Path(image_root) if image_root is not None else pairs.path.parent
    out = output_path(output_dir, pairs.path, shard_index, num_shards)
    repair_tail(out)
    done = count_keys(existing_outputs(output_dir, pairs.path), lambda r: record_key(r, "question", "chosen"))

    indices = select_indices(len(pairs), max_num=sample_max_num, start=sample_start_idx)[shard_index::num_shards]
    jobs, seen, num_complete = [], set(), 0
    for index in indices:
        record, where = pairs[index]
        for field in ("question", "chosen"):
            if not isinstance(record.get(field), str) or not record[field].strip():
                raise DataError(f"{where}: {field!r} must be a non-empty string", "missing field")
        key = record_key(record, "question", "chosen")
        if key in seen:
            continue
        seen.add(key)
        num_done = done[key]
        if num_done >= params.n:
            num_complete += 1
            continue
        prefix = answer_prefix(record["chosen"], start_ratio)
        request = GenerationRequest(
            [{"role": "user", "content": remove_image_placeholders(record["question"])}],
            [],  # the point of the method: the model continues without the image
            replace(params, n=params.n - num_done, seed=derive_seed(params.seed or 0, key, num_done)),
            assistant_prefill=prefix,
        )
        jobs.append(Job(request, _rejected_records(record, prefix)))
    logger.info(
        "%s: %d lines, %d with %d rejected answers already, %d to generate (%s)",
        pairs.path,
        len(seen),
        num_complete,
        params.n,
        len(jobs),
        out,
    )
    num_written = run_jobs(backend, jobs, out, desc="dropout-ntp", progress=progress)
    write_meta(out.parent, pairs.path, root, num_shards)
    num_skipped = sum(job.request.params.n for job in jobs) - num_written
    return RunSummary(out, len(indices), num_complete, len(jobs), num_written, len(indices) - len(seen), num_skipped)


def _rejected_records(record: dict[str, Any], prefix: str):
    def to_records(texts: list[str]) -> list[dict[str, Any]]:
        rejected = [prefix + text.rstrip() for text in texts]
        return [{**record, "rejected": r} for r in rejected if r.strip() != record["chosen"].strip()]

    return to_records


def write_meta(output_dir: Path, input_file: Path, image_root: Path, num_shards: int) -> Path:
    """`<input stem>_meta.json` naming the output file(s) of `input_file` as datasets for `internvl-tune mpo`
    (paths relative to the meta file, as the meta reader resolves them)."""
    output_dir = Path(output_dir)
    root = os.path.relpath(Path(image_root).resolve(), output_dir.resolve())
    entries = {}
    for shard_index in range(num_shards):
        annotation = output_path(output_dir, input_file, shard_index, num_shards)
        name = Path(annotation.name).stem.replace(".", "_")
        entries[name] = {"root": root, "annotation": annotation.name, "repeat_time": 1}
    meta = output_dir / f"{Path(input_file).stem}_meta.json"
    atomic_write_text(meta, json.dumps(entries, indent=2) + "\n")
    return meta
