"""Preference pairs from sampled responses, by correctness (`internvl-tune build-pairs`).

Input: response JSONL files as `sample` writes them, one line per response: the prompt item's fields (`image`,
`answer`, optional `source`, ...), `question` (the prompt the model was asked), `question_orig`, `response` and
`prompt_version`. Each response is judged (`internvl_tune.judge`) against the item's `answer` and falls in one of
three groups of its key (image, question, answer): correct, incorrect, or unparseable (no answer could be read).

For each key, with its responses in file order:

- correctness pairs: every (correct, incorrect) combination, except those whose rejected ANSWER contains the chosen
  answer (case-insensitive: "5" is in "15", "red" in "red and blue"; such a pair may reward nothing wrong);
- format pairs: every (correct, unparseable) combination;
- pairs with the same (image, question, chosen, rejected, answer) are kept once, and pairs whose texts are equal up
  to surrounding whitespace are dropped (an MPO pair must differ);
- each kind is cut to `num_pairs_per_key` pairs drawn at random (kept in order), with a generator seeded by
  (`seed`, file, key, kind): the draw for one key does not depend on the other keys or files.

With `answer_fix`, a correct response whose answer is the ground truth written another way ("60°" for "60",
"(B) 45°" for "B", "1,000" for "1000") gets that answer replaced by the ground truth before it is judged
(`judge.fix_answer`); incorrect responses are never changed.

Worked example (`en` responses, truth "5", default scorers, cap 15)::

    r1 "...\\nFinal answer: 5"      correct
    r2 "...\\nFinal answer: five"   correct (VQA normalisation)
    r3 "...\\nFinal answer: 15"     incorrect, and contains "5": no pair with r1; "15" does not contain "five": (r2, r3)
    r4 "...\\nFinal answer: 6"      incorrect: (r1, r4), (r2, r4)
    r5 "just 5"                     unparseable: format pairs (r1, r5), (r2, r5)

Output folder (the MMPR layout the official MPO scripts read, plus a meta file for `internvl-tune mpo`)::

    raw/<name>_pairs_vqa_correctness_rules.jsonl   {"image", "question", "chosen", "rejected", "answer_gt"}
    raw/<name>_pairs_vqa_format_rules.jsonl        the same, rejected = an unparseable response
    pos_items/<name>.jsonl                         every correct response (its record + "answer_pred")
    neg_items/<name>.jsonl                         {"image", "question", "answer"} of each question never answered
                                                   correctly; "question" is the question as given (question_orig),
                                                   so the file is a prompt file `sample` can read again
    meta.json                                      one dataset per non-empty pair file, repeat_time 1

`<name>` is the response file's name without `.jsonl` and without a shard mark (`x.shard-0-of-4.jsonl` is `x`):
the shards of one prompt file, and files of the same name, are one dataset. A folder given as input stands for its
`.jsonl` files. Every file is written under a temporary name and renamed, meta.json last.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from internvl_tune.atomic import atomic_write_text
from internvl_tune.data.errors import DataError
from internvl_tune.data.jsonl import JsonlFile
from internvl_tune.errors import UserError
from internvl_tune.judge import EXTRACTION_VERSIONS, fix_answer, judge, resolve_scorers

DEFAULT_NUM_PAIRS_PER_KEY = 15
KINDS = ("correctness", "format")  # pair kinds, in the MMPR file names as `_pairs_vqa_<kind>_rules`


_SHARD = re.compile(r"\.shard-\d+-of-\d+$")  # `sample --num-shards` output names


def dataset_name(path: str | Path) -> str:
    """The dataset a response file belongs to: `x.jsonl` and its shards `x.shard-k-of-N.jsonl` are `x`."""
    return _SHARD.sub("", Path(path).name.removesuffix(".jsonl"))


def pair_file(name: str, kind: str) -> str:
    """The MMPR path of a pair file, relative to the output folder."""
    return f"raw/{name}_pairs_vqa_{kind}_rules.jsonl"


@dataclass
class DatasetSummary:
    """Counts of one dataset (a response file and its shards)."""

    name: str
    num_responses: int = 0
    num_keys: int = 0
    num_correct: int = 0
    num_incorrect: int = 0
    num_unparseable: int = 0
    num_fixed: int = 0  # answers rewritten by the answer fix
    num_keys_without_correct: int = 0
    num_keys_without_incorrect: int = 0  # no wrong parseable answer: no correctness pairs for that key
    num_contained: int = 0  # candidate pairs skipped: the rejected answer contains the chosen one
    num_pairs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))


@dataclass
class PairSummary:
    """What `build_pairs` read and wrote."""

    output_dir: Path
    datasets: list[DatasetSummary]
    meta_path: Path | None  # None: no pairs at all, so no meta file

    @property
    def num_pairs(self) -> int:
        return sum(sum(d.num_pairs.values()) for d in self.datasets)

    def format(self) -> str:
        """A one-screen report."""
        total = lambda attr: sum(getattr(d, attr) for d in self.datasets)  # noqa: E731
        lines = [
            f"build-pairs: {len(self.datasets)} dataset(s), {total('num_responses')} responses, {total('num_keys')} questions"
        ]
        for f in self.datasets:
            fixed = f", answer fix rewrote {f.num_fixed}" if f.num_fixed else ""
            lines += [
                f"  {f.name}: {f.num_keys} questions, responses: {f.num_correct} correct, {f.num_incorrect} incorrect, "
                f"{f.num_unparseable} unparseable{fixed}",
                f"    questions with no correct answer: {f.num_keys_without_correct}, "
                f"with no incorrect answer: {f.num_keys_without_incorrect}",
                f"    pairs written: {f.num_pairs['correctness']} correctness, {f.num_pairs['format']} format "
                f"({f.num_contained} candidates skipped: the rejected answer contains the chosen one)",
            ]
        if self.meta_path is None:
            lines.append(
                f"no pairs written to {self.output_dir}: no question has both a correct and a wrong or unparseable "
                "response (sample more answers per question, or at a higher temperature)"
            )
        else:
            lines.append(
                f"wrote {self.num_pairs} pairs: {self.meta_path} (for `internvl-tune mpo`), raw/, pos_items/, neg_items/"
            )
        return "\n".join(lines)


@dataclass
class _Judged:
    record: dict[str, Any]
    answer: str | None
    correct: bool


def _read_responses(path: Path) -> list[tuple[dict[str, Any], str]]:
    """Every record of a response file, checked: a bad line raises a DataError naming `file:line`."""
    file = JsonlFile(path)
    records = []
    for i in range(len(file)):
        record, where = file[i]
        for key in ("question", "response"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: field {key!r} is required and must be a string", "missing field")
        answer = record.get("answer")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            record["answer"] = str(answer)  # a numeric ground truth, as JSON writes numbers
        elif not isinstance(answer, str) or not answer.strip():
            raise DataError(f"{where}: field 'answer' (the ground truth) is required and must be a non-empty string")
        record.setdefault("prompt_version", "en")  # the original's default
        if record["prompt_version"] not in EXTRACTION_VERSIONS:
            raise DataError(
                f"{where}: unknown prompt_version {record['prompt_version']!r}: "
                f"expected one of {', '.join(EXTRACTION_VERSIONS)}"
            )
        image = record.get("image")
        if (
            image is not None
            and not isinstance(image, str)
            and not (isinstance(image, list) and all(isinstance(p, str) for p in image))
        ):
            raise DataError(f"{where}: field 'image' must be a path or a list of paths")
        if not isinstance(record.get("source", ""), str):
            raise DataError(f"{where}: field 'source' must be a string")
        records.append((record, where))
    return records


def _response_paths(inputs: Sequence[str | Path]) -> list[Path]:
    paths = []
    for given in map(Path, inputs):
        if given.is_dir():
            found = sorted(p for p in given.iterdir() if p.suffix == ".jsonl" and p.is_file())
            if not found:
                raise DataError(f"{given}: no .jsonl response files in this folder")
            paths += found
        else:
            paths.append(given)  # JsonlFile reports a missing file
    if not paths:
        raise UserError("no response files given")
    return paths


def _check_images(datasets: dict[str, list[tuple[dict[str, Any], str]]], image_root: str | Path | None) -> None:
    """Every image a record names exists (relative paths under `image_root`): a wrong root is reported here, not by
    the training run that reads the pairs."""
    checked = set()
    for records in datasets.values():
        for record, where in records:
            images = record.get("image") or []
            for image in [images] if isinstance(images, str) else images:
                if image in checked:
                    continue
                if image_root is None and not Path(image).is_absolute():
                    raise DataError(
                        f"{where}: image {image!r} is a relative path: give --image-root, the folder it is relative "
                        "to (sample's --image-root, by default the prompt file's folder)"
                    )
                if not (Path(image_root or "") / image).is_file():
                    raise DataError(f"{where}: image {image!r} not found under {image_root}")
                checked.add(image)


def _key(record: dict[str, Any]) -> tuple[str, str, str]:
    return (json.dumps(record.get("image") or ""), record["question"], record["answer"])


def _pair(chosen: _Judged, rejected: _Judged) -> dict[str, Any]:
    record = chosen.record
    image = {"image": record["image"]} if record.get("image") else {}
    return {
        **image,
        "question": record["question"],
        "chosen": record["response"],
        "rejected": rejected.record["response"],
        "answer_gt": record["answer"],
    }


def _select(candidates: list[dict[str, Any]], limit: int, seed: str) -> list[dict[str, Any]]:
    """Distinct, differing candidates; at most `limit`, drawn with `random.Random(seed)`, in their order."""
    distinct = {}
    for pair in candidates:
        if pair["chosen"].strip() != pair["rejected"].strip():
            distinct.setdefault(json.dumps(pair, sort_keys=True, ensure_ascii=False), pair)
    pairs = list(distinct.values())
    if len(pairs) <= limit:
        return pairs
    # A string seed is hashed with SHA-512 by `random`: the same draw in every process and Python version.
    return [pairs[i] for i in sorted(random.Random(seed).sample(range(len(pairs)), limit))]


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def build_pairs(
    response_files: Sequence[str | Path],
    output_dir: str | Path,
    *,
    num_pairs_per_key: int = DEFAULT_NUM_PAIRS_PER_KEY,
    seed: int = 0,
    answer_fix: bool = False,
    scorers: str = "auto",
    image_root: str | Path | None = None,
) -> PairSummary:
    """Judge every response of `response_files` and write the pair files (module docstring) to `output_dir`.

    Args:
        response_files: response JSONL files (`sample`'s output), or folders of them.
        output_dir: the output folder.
        num_pairs_per_key: the most pairs of each kind per (image, question, answer).
        seed: seeds the draw of pairs when a key has more than `num_pairs_per_key`.
        answer_fix: rewrite correct answers to the ground truth's spelling (`judge.fix_answer`).
        scorers: `auto` (by each record's `source`, else the file name), a kind or a scorer list
            (`judge.resolve_scorers`).
        image_root: the folder the records' image paths are relative to (`sample`'s image root: by default its
            prompt file's folder); the meta file's `root`. Needed when a record names an image by a relative path.

    Raises:
        DataError: a bad response line or a missing image (naming `file:line`).
        ValueError: a bad setting.
    """
    if num_pairs_per_key < 1:
        raise UserError(f"--num-pairs-per-key must be >= 1, got {num_pairs_per_key}")
    resolve_scorers(scorers)  # a bad setting is reported before any file is read
    datasets: dict[str, list[tuple[dict[str, Any], str]]] = {}
    for path in _response_paths(response_files):
        datasets.setdefault(dataset_name(path), []).extend(_read_responses(path))
    _check_images(datasets, image_root)  # everything is checked before anything is written

    output_dir = Path(output_dir)
    summaries, meta = [], {}
    root = str(Path(image_root).resolve()) if image_root is not None else ""
    for name, records in datasets.items():
        summary = DatasetSummary(name, num_responses=len(records))
        groups: dict[tuple[str, str, str], list[_Judged]] = {}
        for record, _ in records:
            truth, version = record["answer"], record["prompt_version"]
            record_scorers = resolve_scorers(scorers, record.get("source") or name)
            if answer_fix:
                fixed = fix_answer(record["response"], truth, version, record_scorers)
                summary.num_fixed += fixed != record["response"]
                record["response"] = fixed
            judgement = judge(record["response"], truth, version, record_scorers)
            groups.setdefault(_key(record), []).append(_Judged(record, judgement.answer, judgement.correct))

        pairs = {kind: [] for kind in KINDS}
        positives, never_correct = [], []
        for key, judged in groups.items():
            correct = [j for j in judged if j.correct]
            incorrect = [j for j in judged if not j.correct and j.answer is not None]
            unparseable = [j for j in judged if j.answer is None]
            summary.num_correct += len(correct)
            summary.num_incorrect += len(incorrect)
            summary.num_unparseable += len(unparseable)
            summary.num_keys_without_correct += not correct
            summary.num_keys_without_incorrect += not incorrect
            positives += [{**j.record, "answer_pred": j.answer} for j in correct]
            if not correct:
                record = judged[0].record
                image = {"image": record["image"]} if record.get("image") else {}
                never_correct.append(
                    {**image, "question": record.get("question_orig", record["question"]), "answer": key[2]}
                )
            candidates = {"correctness": [], "format": []}
            for chosen in correct:
                for rejected in incorrect:
                    if chosen.answer.lower() in rejected.answer.lower():
                        summary.num_contained += 1
                    else:
                        candidates["correctness"].append(_pair(chosen, rejected))
                candidates["format"] += [_pair(chosen, rejected) for rejected in unparseable]
            for kind in KINDS:
                selected = _select(candidates[kind], num_pairs_per_key, f"{seed}\0{name}\0{json.dumps(key)}\0{kind}")
                pairs[kind] += selected
        summary.num_keys = len(groups)

        for kind in KINDS:
            summary.num_pairs[kind] = len(pairs[kind])
            atomic_write_text(output_dir / pair_file(name, kind), _jsonl(pairs[kind]))
            if pairs[kind]:
                meta[f"{name}_{kind}"] = {
                    "root": root,
                    "annotation": pair_file(name, kind),
                    "repeat_time": 1,
                    "length": len(pairs[kind]),
                }
        atomic_write_text(output_dir / "pos_items" / f"{name}.jsonl", _jsonl(positives))
        atomic_write_text(output_dir / "neg_items" / f"{name}.jsonl", _jsonl(never_correct))
        summaries.append(summary)

    meta_path = output_dir / "meta.json"
    if meta:
        atomic_write_text(meta_path, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    elif meta_path.exists():
        meta_path.unlink()  # a previous run's meta would name pairs this run did not make
    return PairSummary(output_dir, summaries, meta_path if meta else None)
