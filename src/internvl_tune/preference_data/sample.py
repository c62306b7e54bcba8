"""`internvl-tune sample`: many answers per question, the first step of correctness-based preference data.

Input: a prompt JSONL, one question per line, `{"image": path | [paths] (optional), "question": str, "answer": ...}`
(image paths relative to `image_root`, by default the prompt file's folder; other fields are kept). Each question
is asked in a prompt version (prompts.py) and answered `n` times by sampling (the original's defaults: n 32,
temperature 0.7, top-k 50, top-p 1.0). Output: `<output_dir>/<prompt file name>`, one line per answer, as the
original pipeline writes it so tools of the MMPR layout read it::

    {"image": "0.png", "question": "<image>\\nWhat colour is ...\\nAnswer the preceding question. ...",
     "answer": "red", "question_orig": "What colour is the shape?", "response": "... Answer: \\\\boxed{red}",
     "prompt_version": "en_v2"}

Lines are keyed by image + original question, and the run is resumable and shardable (resumable.py): a stopped run
continues where it stopped. A question that appears twice in the input is sampled once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from internvl_tune.data.jsonl import JsonlFile
from internvl_tune.generation.base import Backend, GenerationRequest, SamplingParams
from internvl_tune.preference_data.prompts import DEFAULT_PROMPT_VERSION, version_for_file, wrap_question
from internvl_tune.preference_data.resumable import (
    Job,
    check_prompt_line,
    count_keys,
    derive_seed,
    existing_outputs,
    output_path,
    record_key,
    repair_tail,
    run_jobs,
    select_indices,
)

logger = logging.getLogger(__name__)

# The original pipeline's sampling defaults.
DEFAULT_SAMPLING = SamplingParams(n=32, temperature=0.7, top_k=50, top_p=1.0, max_new_tokens=4096, seed=0)


@dataclass
class RunSummary:
    """What a `sample` or `dropout-ntp` run did."""

    output: Path
    num_inputs: int  # input lines this process took (after --sample-max-num and sharding)
    num_complete: int  # keys that already had all their lines
    num_requests: int  # keys generated for in this run
    num_written: int  # lines appended in this run
    num_duplicates: int  # input lines whose key an earlier line has
    num_skipped: int = 0  # outputs not written (dropout-ntp: rejected identical to chosen)


def sample_responses(
    backend: Backend,
    prompt_file: str | Path,
    output_dir: str | Path,
    *,
    params: SamplingParams = DEFAULT_SAMPLING,
    prompt_version: str = DEFAULT_PROMPT_VERSION,
    image_root: str | Path | None = None,
    sample_max_num: int | None = None,
    sample_start_idx: int = 0,
    shard_index: int = 0,
    num_shards: int = 1,
    progress: bool = True,
) -> RunSummary:
    """Sample `params.n` responses to every question of `prompt_file` not yet answered that often.

    Args:
        backend: the model (`HFBackend`, `ServerBackend`).
        prompt_file: the prompt JSONL.
        output_dir: where the response file goes.
        params: sampling parameters; `n` is the number of responses per question, `seed` the run's base seed.
        prompt_version: `en`, `zh`, `en_v2`, `zh_v2`, `en_r1` or `zh_r1` (a file name with `_zh_` switches en to zh).
        image_root: the folder image paths are relative to (default: the prompt file's folder).
        sample_max_num: use at most this many questions, evenly spaced (`--sample-max-num`).
        sample_start_idx: the first of them (`--sample-start-idx`).
        shard_index: this process's shard (lines `shard_index::num_shards`).
        num_shards: the number of processes sharing the file.
        progress: show a progress bar.

    Raises:
        DataError: a line without a question or answer, a bad image field, a missing image, or `<image>`
            placeholders that do not match the images (`file:line`).
    """
    prompts = JsonlFile(prompt_file)
    version = version_for_file(prompt_version, prompt_file)
    root = Path(image_root) if image_root is not None else prompts.path.parent
    out = output_path(output_dir, prompts.path, shard_index, num_shards)
    repair_tail(out)
    done = count_keys(existing_outputs(output_dir, prompts.path), lambda r: record_key(r, "question_orig"))

    indices = select_indices(len(prompts), max_num=sample_max_num, start=sample_start_idx)[shard_index::num_shards]
    jobs, seen, num_complete = [], set(), 0
    for index in indices:
        record, where = prompts[index]
        images = check_prompt_line(record, where, root)
        key = record_key(record, "question")
        if key in seen:
            continue
        seen.add(key)
        num_done = done[key]
        if num_done >= params.n:
            num_complete += 1
            continue
        question = wrap_question(record["question"], version, len(images))
        request = GenerationRequest(
            [{"role": "user", "content": question}],
            images,
            replace(params, n=params.n - num_done, seed=derive_seed(params.seed or 0, key, num_done)),
        )
        jobs.append(Job(request, _response_records(record, question, version)))
    logger.info(
        "%s: %d questions, %d answered %d times already, %d to sample (%s, prompt version %s)",
        prompts.path,
        len(seen),
        num_complete,
        params.n,
        len(jobs),
        out,
        version,
    )
    num_written = run_jobs(backend, jobs, out, desc="sample", progress=progress)
    return RunSummary(out, len(indices), num_complete, len(jobs), num_written, len(indices) - len(seen))


def _response_records(record: dict[str, Any], question: str, version: str):
    def to_records(texts: list[str]) -> list[dict[str, Any]]:
        base = {**record, "question_orig": record["question"], "question": question}
        return [{**base, "response": text.strip(), "prompt_version": version} for text in texts]

    return to_records
