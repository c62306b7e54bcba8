"""`internvl-tune eval` end to end on the tiny model through the CLI: accuracy from the judge, responses to check
by hand, VLMEvalKit's layout, resume, and one-line errors."""

import csv
import json

from conftest import draw_image, write_jsonl

from internvl_tune.cli import main
from internvl_tune.evaluate.benchmark import eval_prompt
from internvl_tune.judge import judge, resolve_scorers


def _benchmark(root, answers):
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, answer in enumerate(answers):
        colour = ("red", "green", "blue")[i % 3]
        draw_image(root / "images" / f"{i}.png", (56, 56) if i % 2 else (112, 56), colour)
        record = {"image": f"images/{i}.png", "question": "What colour is the shape?", "answer": answer}
        if i % 2:
            record["source"] = "chartqa_val"  # relaxed scorer; the others take the file name's default scorers
        records.append(record)
    write_jsonl(root / "bench.jsonl", records)
    return root / "bench.jsonl"


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _eval(bench, out, model, *extra):
    return main(
        ["eval", str(bench), "--out", str(out), "--model", str(model), "--max-new-tokens", "6", "--no-progress", *extra]
    )


def test_eval_accuracy_is_the_judges_count_of_correct_responses(tiny_model_dir, tmp_path, capsys):
    bench = _benchmark(tmp_path / "a", ["red", "green", "blue", "red", "green", "blue"])
    assert _eval(bench, tmp_path / "first", tiny_model_dir) == 0
    first = sorted(_rows(tmp_path / "first" / "responses.jsonl"), key=lambda r: r["index"])
    assert [r["index"] for r in first] == list(range(6))
    # The random model names no colour; so that the count is not 0 == 0, ask again with its own greedy answers as
    # the truth for lines 0, 2 and 3 (greedy: the same answers again).
    assert all(r["answer_pred"] for r in first)
    truths = [r["answer_pred"] if i in (0, 2, 3) else r["answer"] for i, r in enumerate(first)]
    bench = _benchmark(tmp_path / "b", truths)
    assert _eval(bench, tmp_path / "out", tiny_model_dir) == 0

    out = tmp_path / "out"
    rows = _rows(out / "responses.jsonl")
    report = json.loads((out / "report.json").read_text())
    # Independently of the command's bookkeeping: judge each written response again.
    recount = [
        judge(r["response"], r["answer"], "direct", resolve_scorers("auto", r.get("source") or "bench")).correct
        for r in rows
    ]
    assert [r["correct"] for r in rows] == recount
    assert report["num_correct"] == sum(recount) == 3
    assert report["accuracy"] == sum(recount) / len(rows) == 0.5
    assert report["num_questions"] == 6
    per_source = report["per_source"]
    assert set(per_source) == {"bench", "chartqa_val"}
    assert per_source["bench"]["num_correct"] == 2 and per_source["chartqa_val"]["num_correct"] == 1
    assert per_source["chartqa_val"]["scorers"] == ["relaxed"]
    assert all(r["prompt_version"] == "direct" and r["prompt"] == "<image>\nWhat colour is the shape?" for r in rows)

    with open(out / "predictions.tsv", newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    assert list(table[0]) == ["index", "question", "answer", "source", "prediction"]  # the lines' fields but image
    assert [t["index"] for t in table] == [str(i) for i in range(6)]
    assert [t["prediction"] for t in table] == [r["answer_pred"] for r in sorted(rows, key=lambda r: r["index"])]
    assert [t["source"] for t in table] == ["", "chartqa_val"] * 3
    assert "overall" in capsys.readouterr().out

    # Resume: a second run with the same settings asks nothing; other settings in the same folder are refused.
    assert _eval(bench, out, tiny_model_dir) == 0
    assert _rows(out / "responses.jsonl") == rows
    capsys.readouterr()
    assert _eval(bench, out, tiny_model_dir, "--prompt", "cot") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "other settings" in err and err.count("\n") == 1


def test_eval_resumes_after_an_interrupted_run(tiny_model_dir, tmp_path):
    bench = _benchmark(tmp_path, ["red", "green", "blue", "red"])
    assert _eval(bench, tmp_path / "out", tiny_model_dir) == 0
    responses = tmp_path / "out" / "responses.jsonl"
    full = responses.read_text().splitlines(keepends=True)
    responses.write_text("".join(full[:2]) + full[2][:10])  # two answers, then a torn line
    assert _eval(bench, tmp_path / "out", tiny_model_dir) == 0
    again = _rows(responses)
    assert sorted(r["index"] for r in again) == [0, 1, 2, 3]
    assert sorted(again, key=lambda r: r["index"]) == sorted(map(json.loads, full), key=lambda r: r["index"])


def test_cot_eval_asks_the_mpo_prompt_and_reads_final_answer(tiny_model_dir, tmp_path):
    bench = _benchmark(tmp_path, ["red", "green"])
    assert _eval(bench, tmp_path / "out", tiny_model_dir, "--prompt", "cot") == 0
    rows = _rows(tmp_path / "out" / "responses.jsonl")
    assert all(r["prompt_version"] == "en" for r in rows)
    assert rows[0]["prompt"].startswith("<image>\nYour task is to answer the question below.")
    assert rows[0]["prompt"].endswith("Question:\n\nWhat colour is the shape?")


def test_eval_prompts():
    question = "<image>\nHow many?\nAnswer the question using a single word or phrase."
    assert eval_prompt(question, "direct", 1) == question
    assert eval_prompt("How many?", "direct", 1) == "<image>\nHow many?"
    cot = eval_prompt(question, "cot", 1)
    assert cot.startswith("<image>\nYour task is to answer the question below. Give step by step reasoning")
    assert cot.endswith('please use the format "Final answer: .."\n\nQuestion:\n\nHow many?')
    assert eval_prompt("How many?", "cot", 0).startswith("Your task")


def test_eval_errors_are_one_line(tiny_model_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "What colour?"}])
    cases = [
        [str(tmp_path / "bad.jsonl"), "--model", str(tiny_model_dir)],  # no answer
        [str(tmp_path / "missing.jsonl"), "--model", str(tiny_model_dir)],
        [str(_benchmark(tmp_path, ["red"])), "--model", str(tiny_model_dir), "--scorers", "exact"],
        [str(tmp_path / "bench.jsonl"), "--model", str(tmp_path / "no_model")],
        [str(tmp_path / "bench.jsonl"), "--backend", "server"],  # no --base-url
    ]
    errors = []
    for args in cases:
        assert main(["eval", *args, "--out", str(tmp_path / "out")]) == 2, args
        errors.append(capsys.readouterr().err)
        assert errors[-1].startswith("error: ") and errors[-1].count("\n") == 1, (args, errors[-1])
    assert "bad.jsonl:1: 'answer' is required" in errors[0] and "unknown scorer exact" in errors[2]
    assert not (tmp_path / "out").exists()  # nothing written before the arguments were checked


def test_eval_through_a_server_equals_eval_in_process(tiny_model_dir, tmp_path):
    """`--backend server` against serve.py on localhost (serving the same model): the same greedy answers."""
    from internvl_tune.generation.hf import HFBackend
    from internvl_tune.generation.serve import start_server

    bench = _benchmark(tmp_path, ["red", "green", "blue"])
    assert _eval(bench, tmp_path / "hf", tiny_model_dir) == 0
    server = start_server(HFBackend.from_folder(tiny_model_dir))
    try:
        argv = ["eval", str(bench), "--out", str(tmp_path / "server"), "--backend", "server"]
        argv += ["--base-url", server.base_url, "--max-new-tokens", "6", "--no-progress"]
        assert main(argv) == 0
    finally:
        server.shutdown()
    by_index = lambda name: sorted(_rows(tmp_path / name / "responses.jsonl"), key=lambda r: r["index"])  # noqa: E731
    assert [r["response"] for r in by_index("server")] == [r["response"] for r in by_index("hf")]
    settings = json.loads((tmp_path / "server" / "report.json").read_text())["settings"]
    assert settings["model"] == server.base_url


class _ThinkingBackend:
    """Answers every question with a thought, then an answer (the last one's thought never ends)."""

    def __init__(self, responses):
        self.responses = responses
        self.requests = []

    def stream(self, requests):
        self.requests += requests
        for i in range(len(requests)):
            yield i, [self.responses[len(self.requests) - len(requests) + i]]

    def close(self):
        pass


def test_a_thinking_models_answer_is_read_after_its_thought(tmp_path):
    """InternVL3.5 thinking mode: judged on the text after `</think>`; a thought cut by the length limit answers
    nothing; the run records thinking and its longer default."""
    from internvl_tune.evaluate.benchmark import (
        THINKING_MAX_NEW_TOKENS,
        answer_after_thinking,
        evaluate_benchmark,
        load_benchmark,
    )

    assert answer_after_thinking("<think>\nIt is red, not green.\n</think>\n\nRed.") == "Red."
    assert answer_after_thinking("<think>\nIt is red, not") == ""
    assert answer_after_thinking("Red.") == "Red."
    bench = _benchmark(tmp_path, ["red", "green", "blue"])
    backend = _ThinkingBackend(
        ["<think>\nGreen? No: red.\n</think>\n\nRed", "<think>\nred or green\n</think>\n\ngreen", "<think>\nblue"]
    )
    report = evaluate_benchmark(backend, load_benchmark(bench), tmp_path / "out", thinking=True, progress=False)
    rows = sorted(_rows(tmp_path / "out" / "responses.jsonl"), key=lambda r: r["index"])
    assert [r["correct"] for r in rows] == [True, True, False]  # "Green" / "red" in the thoughts are not read
    assert rows[0]["response"].startswith("<think>")  # kept whole for reading
    assert report["settings"]["thinking"] is True
    assert report["settings"]["max_new_tokens"] == THINKING_MAX_NEW_TOKENS == backend.requests[0].params.max_new_tokens
