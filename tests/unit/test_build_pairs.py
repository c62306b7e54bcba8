"""build-pairs on a hand-made response file: the exact pairs, the MMPR layout, the meta file `mpo` reads, the answer
fix, the per-key cap and the command line.

The file (`shapes.jsonl`, default scorers except where a record names its source) holds five questions:

    A  a.png "How many dots?" truth 5 (en)
       r1 "...Final answer: 5"     correct
       r2 "...Final answer: five"  correct (VQA normalisation)
       r3 "...Final answer: 15"    incorrect; "15" contains "5": no (r1, r3); (r2, r3) stays ("five" is not in "15")
       r4 "...Final answer: 6"     incorrect
       r5 "There are 5."           unparseable (no trigger)
       r6 = r4                     a duplicate: its pairs equal r4's and are kept once
    C  b.png "What colour?" truth red: one incorrect, one unparseable -> no pair, listed in neg_items
    D  text only "Say red." truth red: one correct ("Red"), nothing to pair it with
    B  b.png multiple choice, truth B: "(B) square" correct (option letter), "A" incorrect
    E  a.png chart, source chartqa, truth 12 (en_v2): "12.3" correct (relaxed, 2.5%; wrong under the default
       scorers), "15" incorrect

in the order r1 r2 c1 r3 r4 d1 r5 r6 b1 b2 c2 e1 e2, so the keys come A C D B E, and:

    correctness pairs: (r1, r4) (r2, r3) (r2, r4) (b1, b2) (e1, e2)
    format pairs:      (r1, r5) (r2, r5)
"""

import json
import random

import pytest
from conftest import draw_image, write_jsonl

from internvl_tune import judge as judge_module
from internvl_tune.cli import main
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.preference import PairBuilder
from internvl_tune.data.transform import SampleBuilder, SampleSettings
from internvl_tune.preference_data.pairs import build_pairs, dataset_name

QA, QC, QB, QE = (
    "<image>\nHow many dots?",
    "<image>\nWhat colour?",
    "<image>\nWhich shape is red?\nA. circle\nB. square",
    "<image>\nValue of the 2019 bar?",
)


def _record(image, question, answer, response, version="en", **extra):
    record = {"image": image} if image else {}
    return {
        **record,
        "question": question,
        "answer": answer,
        "question_orig": question.removeprefix("<image>\n"),
        "response": response,
        "prompt_version": version,
        **extra,
    }


R = {
    "r1": _record("a.png", QA, "5", "I count them.\nThere are 5.\nFinal answer: 5"),
    "r2": _record("a.png", QA, "5", "I count them.\nThere are five.\nFinal answer: five"),
    "r3": _record("a.png", QA, "5", "I count them.\nThere are 15.\nFinal answer: 15"),
    "r4": _record("a.png", QA, "5", "I count them.\nThere are 6.\nFinal answer: 6"),
    "r5": _record("a.png", QA, "5", "There are 5."),
    "c1": _record("b.png", QC, "red", "It looks blue.\nYes.\nFinal answer: blue"),
    "c2": _record("b.png", QC, "red", "blue"),
    "d1": _record(None, "Say red.", "red", "Okay.\nI say it.\nFinal answer: Red"),
    "b1": _record("b.png", QB, "B", "The square is red.\nSo B.\nFinal answer: (B) square"),
    "b2": _record("b.png", QB, "B", "The circle is red.\nSo A.\nFinal answer: A"),
    "e1": _record("a.png", QE, "12", "The 2019 bar reads 12.3.\nAnswer: \\boxed{12.3}", "en_v2", source="chartqa"),
    "e2": _record("a.png", QE, "12", "The 2019 bar reads 15.\nAnswer: \\boxed{15}", "en_v2", source="chartqa"),
}
ORDER = ["r1", "r2", "c1", "r3", "r4", "d1", "r5", "r4", "b1", "b2", "c2", "e1", "e2"]  # the second r4 is r6


def _write_responses(tmp_path):
    (tmp_path / "images").mkdir()
    draw_image(tmp_path / "images" / "a.png", (56, 56), "red")
    draw_image(tmp_path / "images" / "b.png", (112, 56), "blue")
    path = tmp_path / "responses" / "shapes.jsonl"
    path.parent.mkdir()
    write_jsonl(path, [R[name] for name in ORDER])
    return path


def _pair(chosen, rejected, fixed=None):
    record = R[chosen]
    image = {"image": record["image"]} if "image" in record else {}
    return {
        **image,
        "question": record["question"],
        "chosen": (fixed or {}).get(chosen, record["response"]),
        "rejected": R[rejected]["response"],
        "answer_gt": record["answer"],
    }


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_exact_pairs_layout_and_summary(tmp_path):
    responses = _write_responses(tmp_path)
    out = tmp_path / "pairs"
    summary = build_pairs([responses], out, image_root=tmp_path / "images")

    assert _read(out / "raw/shapes_pairs_vqa_correctness_rules.jsonl") == [
        _pair("r1", "r4"),
        _pair("r2", "r3"),
        _pair("r2", "r4"),
        _pair("b1", "b2"),
        _pair("e1", "e2"),
    ]
    assert _read(out / "raw/shapes_pairs_vqa_format_rules.jsonl") == [_pair("r1", "r5"), _pair("r2", "r5")]
    positives = _read(out / "pos_items/shapes.jsonl")
    assert positives == [
        {**R[name], "answer_pred": answer}
        for name, answer in [("r1", "5"), ("r2", "five"), ("d1", "Red"), ("b1", "(B) square"), ("e1", "12.3")]
    ]
    # the question as given, so that `sample` can ask it again
    assert _read(out / "neg_items/shapes.jsonl") == [{"image": "b.png", "question": "What colour?", "answer": "red"}]
    assert json.loads((out / "meta.json").read_text()) == {
        "shapes_correctness": {
            "root": str((tmp_path / "images").resolve()),
            "annotation": "raw/shapes_pairs_vqa_correctness_rules.jsonl",
            "repeat_time": 1,
            "length": 5,
        },
        "shapes_format": {
            "root": str((tmp_path / "images").resolve()),
            "annotation": "raw/shapes_pairs_vqa_format_rules.jsonl",
            "repeat_time": 1,
            "length": 2,
        },
    }
    assert summary.format().splitlines() == [
        "build-pairs: 1 dataset(s), 13 responses, 5 questions",
        "  shapes: 5 questions, responses: 5 correct, 6 incorrect, 2 unparseable",
        "    questions with no correct answer: 1, with no incorrect answer: 1",
        "    pairs written: 5 correctness, 2 format (1 candidates skipped: the rejected answer contains the chosen one)",
        f"wrote 7 pairs: {out / 'meta.json'} (for `internvl-tune mpo`), raw/, pos_items/, neg_items/",
    ]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # atomic writes leave nothing behind


def test_meta_loads_with_the_mpo_data_loader(tmp_path, tokenizer):
    build_pairs([_write_responses(tmp_path)], tmp_path / "pairs", image_root=tmp_path / "images")
    settings = SampleSettings(image_size=56, num_image_token=4, max_dynamic_patch=6, max_seq_length=4096)
    dataset = RecordDataset(
        tmp_path / "pairs" / "meta.json", PairBuilder(SampleBuilder(tokenizer, settings)), require_data_augment=False
    )
    assert len(dataset) == 7
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s["num_tiles"] for s in samples] == [[1], [1], [1], [3], [1], [1], [1]]  # b.png is 2x1 + thumbnail
    assert tokenizer.decode(samples[0]["chosen_ids"]).startswith("I count them.\nThere are 5.\nFinal answer: 5")
    assert all(s["meta"]["answer_gt"] for s in samples)


def test_answer_fix_rewrites_correct_answers_only_and_judges_after(tmp_path):
    out = tmp_path / "pairs"
    summary = build_pairs([_write_responses(tmp_path)], out, image_root=tmp_path / "images", answer_fix=True)
    fixed = {
        "r2": "I count them.\nThere are five.\nFinal answer: 5",
        "b1": "The square is red.\nSo B.\nFinal answer: B",
    }
    # r2 now answers "5", which "15" contains: (r2, r3) goes. r3 is not rewritten: the original turned its "15" into
    # "5" (a substring match) and kept it as a rejected response that states the right answer.
    assert _read(out / "raw/shapes_pairs_vqa_correctness_rules.jsonl") == [
        _pair("r1", "r4"),
        _pair("r2", "r4", fixed),
        _pair("b1", "b2", fixed),
        _pair("e1", "e2"),  # 12.3 is right within the chart tolerance, not the truth respelt: kept as written
    ]
    assert _read(out / "raw/shapes_pairs_vqa_format_rules.jsonl") == [_pair("r1", "r5"), _pair("r2", "r5", fixed)]
    d1 = _read(out / "pos_items/shapes.jsonl")[2]
    assert d1["response"] == "Okay.\nI say it.\nFinal answer: red" and d1["answer_pred"] == "red"
    assert summary.datasets[0].num_fixed == 3 and summary.datasets[0].num_contained == 2


def _many(num_correct: int, wrong: list[str]):
    correct = [
        _record(None, "What is 3 + 4?", "7", f"Step {i}.\n3 + 4 = 7.\nFinal answer: 7") for i in range(num_correct)
    ]
    incorrect = [_record(None, "What is 3 + 4?", "7", f"Oops.\n3 + 4 = {w}.\nFinal answer: {w}") for w in wrong]
    return correct + incorrect


def test_cap_per_key_is_a_seeded_draw_independent_of_other_keys(tmp_path):
    records = _many(4, ["8", "9", "6", "4"])  # 16 candidate pairs
    everything = tmp_path / "all" / "sums.jsonl"
    everything.parent.mkdir()
    write_jsonl(everything, records)
    build_pairs([everything], tmp_path / "all_out", num_pairs_per_key=100)
    candidates = _read(tmp_path / "all_out/raw/sums_pairs_vqa_correctness_rules.jsonl")
    assert len(candidates) == 16

    def draw(seed, extra=()):
        path = tmp_path / f"seed{seed}_{len(extra)}" / "sums.jsonl"
        path.parent.mkdir()
        write_jsonl(path, [*extra, *records])
        build_pairs([path], path.parent / "out", num_pairs_per_key=5, seed=seed)
        pairs = _read(path.parent / "out/raw/sums_pairs_vqa_correctness_rules.jsonl")
        return [p for p in pairs if p["question"] == "What is 3 + 4?"]

    first = draw(0)
    assert len(first) == 5
    indices = [candidates.index(p) for p in first]
    assert indices == sorted(indices)  # a subset, in candidate order
    # the same draw with another question in the file before it, and a different one with another seed
    other = _record(None, "What is 1 + 1?", "2", "One.\n1 + 1 = 3.\nFinal answer: 3")
    assert draw(0, [other, {**other, "response": "One.\n1 + 1 = 2.\nFinal answer: 2"}]) == first
    assert draw(1) != first
    key = json.dumps([json.dumps(""), "What is 3 + 4?", "7"])  # (image, question, answer)
    expected = sorted(random.Random(f"0\0sums\0{key}\0correctness").sample(range(16), 5))
    assert indices == expected  # the documented seed: (seed, dataset, key, kind)


@pytest.mark.parametrize("math_verify", [True, False])
def test_a_fraction_written_another_way_is_chosen(tmp_path, monkeypatch, math_verify):
    """ "3/4" against a truth "\\frac{3}{4}" is correct, with math-verify or without it (it was rejected without)."""
    if not math_verify:
        monkeypatch.setattr(judge_module, "_math_verify", lambda: None)
    question = "What fraction is shaded?"
    right = _record(None, question, "\\frac{3}{4}", "Three of four parts.\nThat is 3/4.\nFinal answer: 3/4")
    wrong = _record(None, question, "\\frac{3}{4}", "Three of five parts.\nThat is 3/5.\nFinal answer: 3/5")
    path = tmp_path / "fractions.jsonl"
    write_jsonl(path, [right, wrong])
    build_pairs([path], tmp_path / "out")
    assert _read(tmp_path / "out/raw/fractions_pairs_vqa_correctness_rules.jsonl") == [
        {"question": question, "chosen": right["response"], "rejected": wrong["response"], "answer_gt": "\\frac{3}{4}"}
    ]


def test_shards_of_one_prompt_file_are_one_dataset(tmp_path):
    records = _many(1, ["8", "9"])
    folder = tmp_path / "responses"
    folder.mkdir()
    write_jsonl(folder / "sums.shard-0-of-2.jsonl", records[:2])  # one correct, one incorrect
    write_jsonl(folder / "sums.shard-1-of-2.jsonl", records[2:])  # the other incorrect one
    summary = build_pairs([folder], tmp_path / "out")  # a folder stands for its .jsonl files
    assert dataset_name(folder / "sums.shard-1-of-2.jsonl") == "sums"
    assert [d.name for d in summary.datasets] == ["sums"] and summary.datasets[0].num_keys == 1
    assert len(_read(tmp_path / "out/raw/sums_pairs_vqa_correctness_rules.jsonl")) == 2


def test_cli_build_pairs(tmp_path, capsys):
    responses = _write_responses(tmp_path)
    out = tmp_path / "pairs"
    assert main(["build-pairs", str(responses), "--out", str(out), "--image-root", str(tmp_path / "images")]) == 0
    assert "pairs written: 5 correctness, 2 format" in capsys.readouterr().out
    assert (out / "meta.json").is_file()

    # no pair at all: exit 1 and no meta file (a stale one is removed)
    all_correct = tmp_path / "easy" / "shapes.jsonl"
    all_correct.parent.mkdir()
    write_jsonl(all_correct, [R["d1"], R["d1"]])
    assert main(["build-pairs", str(all_correct), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"no pairs written to {out}: no question has both a correct and a wrong" in text
    assert not (out / "meta.json").exists()


@pytest.mark.parametrize(
    "lines, args, message",
    [
        (['{"question": "q", "answer": "5", "response": "r"}', "{not json"], [], r"shapes.jsonl:2: malformed JSON"),
        (['{"question": "q", "answer": "5"}'], [], r"shapes.jsonl:1: field 'response' is required"),
        (['{"question": "q", "answer": "", "response": "r"}'], [], r"shapes.jsonl:1: field 'answer'"),
        (
            ['{"question": "q", "answer": "5", "response": "r", "prompt_version": "en_v9"}'],
            [],
            r"shapes.jsonl:1: unknown prompt_version 'en_v9'",
        ),
        (
            ['{"image": "a.png", "question": "q", "answer": "5", "response": "r"}'],
            [],
            r"shapes.jsonl:1: .*--image-root",
        ),
        (
            ['{"image": "gone.png", "question": "q", "answer": "5", "response": "r"}'],
            ["--image-root", "."],
            r"shapes.jsonl:1: image 'gone.png' not found",
        ),
        (['{"question": "q", "answer": "5", "response": "r"}'], ["--scorers", "vqa,bogus"], r"unknown scorer bogus"),
        (['{"question": "q", "answer": "5", "response": "r"}'], ["--num-pairs-per-key", "0"], r"must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_error_line(tmp_path, capsys, lines, args, message):
    import re

    path = tmp_path / "shapes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["build-pairs", str(path), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and re.search(message, err), err
    assert not out.exists()  # nothing written
