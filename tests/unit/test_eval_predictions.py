"""eval's predictions.tsv against VLMEvalKit's prediction layout (`vlmeval/inference.py` writes the dataset's rows
without `image`, plus `prediction`; `ImageMCQDataset.evaluate` reads `index`, `question`, `prediction` and the option
columns `A`..`Z`; `ImageVQADataset.evaluate` reads `answer` and `prediction`), read back as its `load()` reads a TSV
(pandas' `read_csv(sep="\\t")`: the csv module's dialect)."""

import csv
import io

from conftest import draw_image, write_jsonl

from internvl_tune.evaluate.benchmark import load_benchmark, predictions_tsv


def _table(text):
    return list(csv.reader(io.StringIO(text), delimiter="\t"))


def _answered(predictions):
    """responses.jsonl rows as eval writes them: the line's position as "index", the extracted answer."""
    return [{"index": i, "answer_pred": p} for i, p in enumerate(predictions)]


def test_multiple_choice_benchmark_keeps_every_column_but_image(tmp_path):
    draw_image(tmp_path / "q.png", (28, 28), "red")
    mmbench_like = [
        {
            "index": 1000,  # VLMEvalKit's own index: its MCQ evaluation looks each row up by it in the dataset
            "image": "q.png",
            "question": "<image>\nWhich colour is the square?",
            "hint": "Look at the square.",
            "A": "red",
            "B": "green",
            "C": "blue",
            "D": "black",
            "answer": "A",
            "category": "colour",
            "l2-category": "perception",
            "split": "dev",
        },
        {
            "index": 1001,
            "image": "q.png",
            "question": "<image>\nHow many squares?",
            "A": "1",
            "B": "2",
            "C": "3",  # three options: D stays empty, as in VLMEvalKit's TSVs
            "answer": "A",
            "category": "count",
            "l2-category": "perception",
            "split": "dev",
        },
    ]
    write_jsonl(tmp_path / "mmbench.jsonl", mmbench_like)
    questions = load_benchmark(tmp_path / "mmbench.jsonl")

    table = _table(predictions_tsv(questions, _answered(["(A) red", None])))
    assert table == [
        ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "prediction"],
        [
            "1000",
            "<image>\nWhich colour is the square?",
            "Look at the square.",
            "red",
            "green",
            "blue",
            "black",
            "A",
            "colour",
            "perception",
            "dev",
            "(A) red",
        ],
        ["1001", "<image>\nHow many squares?", "", "1", "2", "3", "", "A", "count", "perception", "dev", ""],
    ]


def test_vqa_benchmark_answer_lists_and_positions(tmp_path):
    textvqa_like = [
        {"question": "What does the sign say?", "answer": ["stop", "stop", "halt"], "source": "textvqa"},
        {"question": "Name\tthe brand.\nOne word.", "answer": "acme"},  # a tab and a line break: quoted
        {"question": "Asked, not answered yet.", "answer": "x"},
    ]
    write_jsonl(tmp_path / "textvqa.jsonl", textvqa_like)
    questions = load_benchmark(tmp_path / "textvqa.jsonl")

    table = _table(predictions_tsv(questions, _answered(["stop", "Acme"])))
    assert table == [
        ["index", "question", "answer", "source", "prediction"],
        ["0", "What does the sign say?", "['stop', 'stop', 'halt']", "textvqa", "stop"],  # eval()-able, as VLMEvalKit's
        ["1", "Name\tthe brand.\nOne word.", "acme", "", "Acme"],  # no index field: the line's position
    ]
