"""`internvl-tune eval`: a model's accuracy on a JSONL benchmark, scored by the judge that builds preference pairs.

Input: one question per line, `{"image": path | [paths] (optional), "question": str, "answer": ..., "source": str
(optional)}`, image paths relative to `image_root` (by default the benchmark file's folder). Each question is asked
in one of two ways and the response judged (`internvl_tune.judge`) with the matching extraction:

- `direct`: the question as it is (a short-answer instruction stays); the answer is what follows the last
  "Answer:" on its line, else the whole response (the judge's `direct` extraction).
- `cot`: the chain-of-thought prompt MPO models are evaluated with (`prompts.mpo_cot_prompt`, VLMEvalKit's MPO
  prompt: reason step by step, then "Final answer: .."), after a trailing short-answer instruction is cut off
  (it asks for the opposite of reasoning); the answer is read after "Final answer:" (the `en` extraction).

Greedy decoding by default. The scorers come from each line's `source` (else the benchmark file's name) as
`build-pairs` chooses them (`resolve_scorers`), or are named once for all lines.

Output folder::

    responses.jsonl   one line per question, in completion order: the input line plus "index" (its position in
                      the benchmark), "prompt" (the user turn sent), "response", "answer_pred" (null when
                      unparseable), "score", "correct", "prompt_version" (the extraction used)
    report.json       accuracy overall and per source, the counts, the settings
    predictions.tsv   VLMEvalKit's prediction layout (`predictions_tsv`): index, every other field of the line but
                      image, prediction (the extracted answer)
    run.json          the settings, so a resumed run cannot mix two evaluations in one folder

Worked example: 4 questions, sources "colour" (3) and "count" (1), correct on 2 colour questions ->
`{"accuracy": 0.5, "num_correct": 2, "num_questions": 4, "per_source": {"colour": {"accuracy": 0.667, ...},
"count": {"accuracy": 0.0, ...}}}`.

Resumable: responses are appended (flushed and synced) as they complete, and a run started again with the same
settings asks only the questions that have no response yet; report.json and predictions.tsv are rewritten from
all of them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from internvl_tune.atomic import atomic_write_text
from internvl_tune.constants import IMAGE_PLACEHOLDER
from internvl_tune.data.jsonl import JsonlFile
from internvl_tune.data.placeholders import user_turn
from internvl_tune.errors import UserError
from internvl_tune.generation.base import Backend, GenerationRequest, SamplingParams
from internvl_tune.judge import judge, resolve_scorers
from internvl_tune.preference_data.prompts import mpo_cot_prompt, strip_short_answer_instruction
from internvl_tune.preference_data.resumable import (
    Job,
    check_prompt_line,
    count_keys,
    derive_seed,
    repair_tail,
    run_jobs,
)

logger = logging.getLogger(__name__)

# How a question is asked -> how its answer is read (the judge's extraction version).
PROMPTS = {"direct": "direct", "cot": "en"}
# Longest response: a short answer, or a chain of thought (VLMEvalKit's CoT evaluations allow 4096 tokens).
DEFAULT_MAX_NEW_TOKENS = {"direct": 64, "cot": 4096}
THINKING_MAX_NEW_TOKENS = 16384  # a thinking model reasons before it answers, whatever the prompt


def answer_after_thinking(response: str) -> str:
    """What a response answers: the text after its `</think>` (InternVL3.5's thinking mode), the whole response
    when it has no thought, and "" when its thought never ended (cut by max_new_tokens: no answer was given).

    Example: `answer_after_thinking("<think>\nTwo red shapes.\n</think>\n\nTwo.")` -> "Two."
    """
    if "</think>" in response:
        return response.rsplit("</think>", 1)[1].strip()
    return "" if response.lstrip().startswith("<think>") else response


RESPONSES, REPORT, PREDICTIONS, RUN = "responses.jsonl", "report.json", "predictions.tsv", "run.json"


@dataclass(frozen=True)
class Question:
    """One benchmark line, checked: its images resolved against the image root."""

    index: int
    record: dict[str, Any]
    images: list[str]
    source: str


def load_benchmark(path: str | Path, *, image_root: str | Path | None = None) -> list[Question]:
    """Read and check a benchmark file (every line, before anything is generated).

    Raises:
        DataError: a line without a question or answer, a bad image field, a missing image, or `<image>`
            placeholders that do not match the images (`file:line`).
    """
    lines = JsonlFile(path)
    root = Path(image_root) if image_root is not None else lines.path.parent
    questions = []
    for index in range(len(lines)):
        record, where = lines[index]
        images = check_prompt_line(record, where, root)
        source = str(record.get("source") or lines.path.stem)
        questions.append(Question(index, record, images, source))
    return questions


def eval_prompt(question: str, prompt: str, num_images: int) -> str:
    """The user turn that asks `question` (`direct` or `cot`, module docstring), with the images' placeholders.

    Example: `eval_prompt("<image>\\nHow many?\\nAnswer the question using a single word or phrase.", "cot", 1)`
    == `"<image>\\nYour task is to answer the question below. ... \\n\\nQuestion:\\n\\nHow many?"`.
    """
    if prompt == "direct":
        return user_turn(question, num_images)
    question = strip_short_answer_instruction(question)
    if num_images and question.count(IMAGE_PLACEHOLDER) == 1:  # one image: in front, as training puts it
        question = question.replace(IMAGE_PLACEHOLDER + "\n", "", 1).replace(IMAGE_PLACEHOLDER, "", 1)
    return user_turn(mpo_cot_prompt(question.strip()), num_images)


def evaluate_benchmark(
    backend: Backend,
    questions: list[Question],
    output_dir: str | Path,
    *,
    prompt: str = "direct",
    scorers: str = "auto",
    thinking: bool = False,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer every question not answered yet in `output_dir`, judge the answers and write the report.

    Args:
        backend: the model (`HFBackend`, `ServerBackend`).
        questions: the benchmark (`load_benchmark`).
        output_dir: where responses.jsonl, report.json, predictions.tsv and run.json go.
        prompt: `direct` or `cot`.
        scorers: `auto` (by each line's source), a kind or a comma list (`judge.resolve_scorers`).
        thinking: the backend prompts in thinking mode (recorded; the default length is `THINKING_MAX_NEW_TOKENS`).
            Every response is judged on `answer_after_thinking`.
        max_new_tokens: longest response (default: `DEFAULT_MAX_NEW_TOKENS[prompt]`).
        temperature: 0 = greedy.
        seed: with a temperature, each question's draw is seeded from it.
        settings: more to record in run.json and the report (the model, the benchmark file); a folder holding a
            run with other settings is refused.
        progress: show a progress bar.

    Returns:
        The report (as written to report.json).

    Raises:
        ValueError: an unknown prompt or scorer, or `output_dir` holds an evaluation with other settings.
    """
    scorers_by_source = {q.source: resolve_scorers(scorers, q.source) for q in questions}
    run = prepare_output(output_dir, prompt, scorers, max_new_tokens, temperature, seed, settings, thinking=thinking)
    params = SamplingParams(n=1, temperature=temperature, max_new_tokens=run["max_new_tokens"], seed=seed)
    out = Path(output_dir)
    if not (out / RUN).is_file():
        atomic_write_text(out / RUN, json.dumps(run, indent=2, ensure_ascii=False) + "\n")
    responses = out / RESPONSES
    repair_tail(responses)
    done = count_keys([responses] if responses.is_file() else [], lambda r: r["index"])

    version = PROMPTS[prompt]
    jobs = []
    for q in questions:
        if done[q.index]:
            continue
        text = eval_prompt(q.record["question"], prompt, len(q.images))
        request = GenerationRequest(
            [{"role": "user", "content": text}], q.images, replace(params, seed=derive_seed(seed, q.index))
        )
        jobs.append(Job(request, _judged_records(q, text, version, scorers_by_source[q.source])))
    logger.info(
        "%d questions, %d answered before, %d to ask (%s prompt)",
        len(questions),
        len(questions) - len(jobs),
        len(jobs),
        prompt,
    )
    run_jobs(backend, jobs, responses, desc="eval", progress=progress)

    rows = _read_rows(responses, {q.index for q in questions})
    report = {
        **summarize(rows),
        "per_source": {
            source: {
                **summarize([r for r in rows if r["source"] == source]),
                "scorers": list(scorers_by_source[source]),
            }
            for source in dict.fromkeys(q.source for q in questions)
        },
        "settings": run,
    }
    atomic_write_text(out / PREDICTIONS, predictions_tsv(questions, rows))
    atomic_write_text(out / REPORT, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def prepare_output(
    output_dir: str | Path,
    prompt: str = "direct",
    scorers: str = "auto",
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    *,
    thinking: bool = False,
) -> dict[str, Any]:
    """The run's settings, checked against those of the run that wrote `output_dir/run.json` before (a resumed run
    must not mix two evaluations). Cheap: the CLI calls it before a model loads.

    Raises:
        ValueError: an unknown prompt, or the folder holds an evaluation with other settings.
    """
    if prompt not in PROMPTS:
        raise UserError(f"unknown prompt {prompt!r}: expected one of {', '.join(PROMPTS)}")
    run = {
        **(settings or {}),
        "prompt": prompt,
        "scorers": scorers,
        **({"thinking": True} if thinking else {}),  # absent when off: folders written before it still resume
        "max_new_tokens": max_new_tokens or (THINKING_MAX_NEW_TOKENS if thinking else DEFAULT_MAX_NEW_TOKENS[prompt]),
        "temperature": temperature,
        "seed": seed,
    }
    path = Path(output_dir) / RUN
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in run.items() if before.get(k) != v]
        if changed:
            raise UserError(
                f"{path.parent} holds an evaluation with other settings ({'; '.join(changed)}): use another --out"
            )
    return run


def _judged_records(q: Question, prompt_text: str, version: str, scorers: tuple[str, ...]):
    def to_records(texts: list[str]) -> list[dict[str, Any]]:
        response = texts[0].strip()
        judgement = judge(answer_after_thinking(response), str(q.record["answer"]), version, scorers)
        return [
            {
                **q.record,
                "index": q.index,
                "source": q.source,
                "prompt": prompt_text,
                "response": response,
                "answer_pred": judgement.answer,
                "score": judgement.score,
                "correct": judgement.correct,
                "prompt_version": version,
            }
        ]

    return to_records


def _read_rows(path: Path, indices: set[int]) -> list[dict[str, Any]]:
    """The responses of the benchmark's questions, one per question (the first written), in benchmark order."""
    rows: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if row["index"] in indices:
                    rows.setdefault(row["index"], row)
    return [rows[i] for i in sorted(rows)]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and counts of judged responses.

    Example: rows judged correct, wrong and unparseable -> `{"accuracy": 0.333.., "num_correct": 1,
    "num_questions": 3, "num_unparseable": 1}`.
    """
    num_correct = sum(bool(r["correct"]) for r in rows)
    return {
        "accuracy": num_correct / len(rows) if rows else 0.0,
        "num_correct": num_correct,
        "num_questions": len(rows),
        "num_unparseable": sum(r["answer_pred"] is None for r in rows),
    }


def predictions_tsv(questions: list[Question], rows: list[dict[str, Any]]) -> str:
    """The answered questions in VLMEvalKit's prediction layout: the file its inference writes and its evaluators
    read (`{model}_{dataset}.tsv`): every column of the benchmark line but `image`, then `prediction`.

    `index` comes first: the line's own `index` field (VLMEvalKit's multiple-choice evaluation matches it against its
    copy of the dataset), else the line's position from 0. `prediction` is the extracted answer, empty when the
    response was unparseable. Lists are written as VLMEvalKit's TSVs hold them (`['a', 'b']`, read back with
    `eval`); a field with tabs or line breaks is quoted, as pandas reads it.

    Example: the lines `{"image": "1.png", "question": "Colour?", "A": "red", "B": "blue", "answer": "A"}` and
    `{"question": "How many?", "answer": "2", "category": "count"}`, answered "A" and "3", give the columns
    `index question A B answer category prediction` and the rows `0 Colour? red blue A _ A` and
    `1 How many? _ _ 2 count 3` (`_`: an empty field).
    """
    predictions = {r["index"]: r["answer_pred"] for r in rows}
    answered = [q for q in questions if q.index in predictions]
    columns = list(dict.fromkeys(k for q in answered for k in q.record if k not in ("index", "image", "prediction")))
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(["index", *columns, "prediction"])
    for q in answered:
        cells = [q.record.get(column) for column in columns]
        writer.writerow(
            [q.record.get("index", q.index), *("" if c is None else c for c in cells), predictions[q.index] or ""]
        )
    return buffer.getvalue()


def format_report(report: dict[str, Any]) -> str:
    """A short table: accuracy per source and overall."""
    width = max([len("overall"), *(len(s) for s in report["per_source"])]) + 2
    lines = [f"{'source':<{width}}{'questions':>10}{'correct':>9}{'accuracy':>10}"]
    for name, s in [*report["per_source"].items(), ("overall", report)]:
        lines.append(f"{name:<{width}}{s['num_questions']:>10}{s['num_correct']:>9}{s['accuracy']:>10.1%}")
    if report["num_unparseable"]:
        lines.append(f"{report['num_unparseable']} responses had no answer the judge could read (scored 0)")
    return "\n".join(lines)
