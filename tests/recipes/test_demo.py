"""`internvl-tune demo --quick` end to end through the CLI: task, tiny model, eval, SFT, eval, sampling, pairs, MPO,
eval, RL, eval, report."""

import importlib.util
import json
import os
import signal
from pathlib import Path

import torch

from internvl_tune.cli import main
from internvl_tune.demo.run import cpu_threads
from internvl_tune.demo.task import QUESTION_TYPES, cot_answer, make_task, task_prompt
from internvl_tune.judge import judge
from internvl_tune.training.metrics import MetricsWriter, read_metrics


def test_quick_demo_writes_a_passing_report(tmp_path, capsys, monkeypatch):
    threads = torch.get_num_threads()
    assert main(["demo", "--quick", "--output-dir", str(tmp_path), "num_threads=1", "rl_steps=2"]) == 0
    assert torch.get_num_threads() == threads  # the demo's thread count does not outlive it

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is True
    assert report["pass_criterion"] == "loss_decrease"
    # 6 steps on 24 images teach no answers yet: over seeds 0-4 every accuracy was 0 before and after (40 steps of 8
    # took 2 minutes and still answered none), so accuracy margins belong to the full demo. What the quick demo
    # reliably shows: the loss falls by more than 0.5, the random model's greedy answers are never task answers (a
    # matching bug that counts garbage or empty answers as right would score them), and the answers after SFT are
    # the trained model's (all 9 examples changed over seeds 0-4).
    everything = (*QUESTION_TYPES, "overall")
    assert report["accuracy_before"] == {kind: 0.0 for kind in everything}
    assert set(report["accuracy_after"]) == set(report["accuracy_after_mpo"]) == set(everything)
    assert all(example["after"] != example["before"] for example in report["examples"])
    settings = report["settings"]
    assert len(report["losses"]) == settings["max_steps"]
    assert report["losses"][-1] < report["losses"][0] - 0.5
    assert report["num_eval_questions"] == settings["num_eval"] * len(QUESTION_TYPES)
    stages = {"data", "model", "eval_before", "train", "eval_sft", "sample", "pairs", "mpo", "eval_mpo", "total"}
    stages |= {"rl", "eval_rl"}  # asked for: rl_steps=2
    assert set(report["seconds"]) == stages

    # Each stage's files: the evaluations' judged responses, the sampled answers, the pairs, the MPO run.
    for name in ("eval_before", "eval_sft", "eval_mpo", "eval_rl"):
        rows = [json.loads(line) for line in (tmp_path / name / "responses.jsonl").read_text().splitlines()]
        assert len(rows) == report["num_eval_questions"] and all(r["prompt_version"] == "en" for r in rows)
        assert json.loads((tmp_path / name / "report.json").read_text())["num_correct"] == sum(
            r["correct"] for r in rows
        )
    mpo = report["mpo"]
    num_prompts = settings["num_prompts"] * len(QUESTION_TYPES)
    sampled = (tmp_path / "responses" / "prompts.jsonl").read_text().splitlines()
    assert len(sampled) == mpo["sampling"]["num_responses"] == num_prompts * settings["num_samples"]
    assert mpo["sampling"]["num_questions"] == num_prompts
    # The quick model's answers are not parseable yet: no sampled pairs, so MPO ran on ground-truth pairs (and says so).
    assert mpo["pairs"]["source"] in ("sampled", "ground truth (no sampled pairs)")
    # The pair count is that of the data MPO trained on, whichever its source (it said 0 for ground-truth pairs).
    meta = Path(json.loads((tmp_path / "mpo_run" / "config.resolved.json").read_text())["data"]["meta_path"])
    (dataset,) = json.loads(meta.read_text()).values()
    num_pairs = len((meta.parent / dataset["annotation"]).read_text().splitlines())
    assert mpo["pairs"]["num_pairs"] == num_pairs > 0
    assert len(mpo["losses"]) == len(mpo["reward_margins"]) == settings["mpo_steps"]
    # The MPO model is not its reference: some held-out chosen rewards beat the rejected.
    assert mpo["reward_accuracy"]["reward_accuracy"] > 0.0
    assert (tmp_path / "mpo_run" / "final" / "config.json").is_file()
    # The RL stage: GSPO from the MPO model on fresh count and shape questions, then the benchmark.
    assert set(report["accuracy_after_rl"]) == set(everything)
    assert report["rl"]["start_model"] == mpo["final_model"] and len(report["rl"]["rewards"]) == 2
    rl_prompts = (tmp_path / "rl_data" / "rl_prompts.jsonl").read_text().splitlines()
    assert len(rl_prompts) == 4 * 2 and {json.loads(line)["source"] for line in rl_prompts} <= {"count", "shape"}
    assert (tmp_path / "rl_run" / "final" / "config.json").is_file()
    logged = [json.loads(line) for line in (tmp_path / "rl_run" / "rollouts" / "step_000002.jsonl").open()]
    assert len(logged) == 2 * 2 and {r["question"] for r in logged} <= {json.loads(p)["question"] for p in rl_prompts}
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert (tmp_path / "data" / "meta.json").is_file()
    out = capsys.readouterr().out
    assert "PASSED" in out and "after MPO" in out and "after RL" in out and f"MPO on {num_pairs} pairs (" in out
    # The plot needs the optional matplotlib: without it the report says there is none.
    if importlib.util.find_spec("matplotlib") is None:
        assert report["plot"] is None and not (tmp_path / "curves.png").exists()
    else:
        assert report["plot"] == str(tmp_path / "curves.png") and (tmp_path / "curves.png").stat().st_size > 0

    # benchmarks/demo_rl.py on this folder: every stage on a fresh benchmark, and the supervised ceiling, trained on
    # the RL stage's first rl_steps x rl_prompts_per_step questions with their right answers.
    # Given as the docs give it, relative to the working folder; a second folder that is no demo is one line and
    # costs the first one nothing.
    demo_rl = _load_benchmark_script("demo_rl")
    monkeypatch.chdir(tmp_path.parent)
    assert demo_rl.main(["--num-eval", "2", tmp_path.name, "no-demo-here"]) == 2
    table, errors = capsys.readouterr()
    (error,) = [line for line in errors.splitlines() if line.startswith("error:")]
    assert error.endswith("/no-demo-here: no such folder")
    for stage in ("after SFT", "after MPO", "after RL", "supervised ceiling"):
        assert f"| {settings['seed']} | {stage} |" in table
    assert "Count and shape by right answer" in table
    work = tmp_path / "demo_rl_benchmark"
    supervised = [json.loads(line) for line in (work / "supervised" / "supervised.jsonl").read_text().splitlines()]
    asked = [json.loads(line) for line in rl_prompts[: 2 * settings["rl_prompts_per_step"]]]
    assert [r["conversations"][1]["value"] for r in supervised] == [cot_answer(item["answer"]) for item in asked]
    assert [r["conversations"][0]["value"] for r in supervised] == [task_prompt(item["question"]) for item in asked]
    steps = [row["step"] for row in read_metrics(work / "supervised" / "run" / "metrics.jsonl")]
    assert steps == [1, 2]
    benchmark = (work / "benchmark_2" / "benchmark.jsonl").read_text().splitlines()
    assert len(benchmark) == 2 * len(QUESTION_TYPES)
    (tmp_path / "empty").mkdir()
    assert demo_rl.main([str(tmp_path / "empty")]) == 2
    assert "no report.json" in capsys.readouterr().err


def test_bad_rl_settings_stop_the_demo_before_any_stage(tmp_path, capsys):
    """An RL setting is checked with the others, in one line naming the demo's field, before minutes of SFT and MPO."""
    for override, message in (
        ("rl_steps=-1", "rl_steps must be >= 0"),
        ("rl_generations=0", "rl_generations must be >= 1"),
        ("rl_prompts_per_step=0", "rl_prompts_per_step must be >= 1"),
        ("rl_learning_rate=-1", "rl_learning_rate must be >= 0"),
        ("rl_scale_rewards=std", "rl_scale_rewards must be one of group, batch, none, mean, got 'std'"),
        ("rl_question_types=[count, size]", "rl_question_types must be some of colour, count, shape"),
        ("rl_question_types=count", "override 'rl_question_types=count': expected a list, got 'count'"),
    ):
        out = tmp_path / override.split("=")[0]
        assert main(["demo", "--quick", "--output-dir", str(out), override]) == 2
        assert message in capsys.readouterr().err
        assert not (out / "data").exists()  # nothing ran


def _load_benchmark_script(name: str):
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ctrl_c_in_the_demo_says_it_starts_over_not_how_to_resume_a_run(tmp_path, capsys, monkeypatch):
    """The SFT stage's own line advises train.resume_from_checkpoint=auto, which `demo` does not take."""
    write = MetricsWriter.write

    def write_then_signal(self, step, values):
        write(self, step, values)
        os.kill(os.getpid(), signal.SIGINT)  # as a Ctrl-C while SFT's step 1 finishes

    monkeypatch.setattr(MetricsWriter, "write", write_then_signal)
    assert main(["demo", "--quick", "--output-dir", str(tmp_path), "mpo_steps=0", "num_eval=1"]) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"demo interrupted; it does not resume: the same command starts it over (in {tmp_path})\n")
    assert "resume_from_checkpoint" not in err and not (tmp_path / "report.json").exists()


def test_cpu_threads_leave_the_cores_other_processes_use():
    assert cpu_threads(cores=2, load=0.1) == 2  # an idle machine: every core
    assert cpu_threads(cores=2, load=2.7) == 1  # busy: one thread, never none
    assert cpu_threads(cores=16, load=3.2) == 13
    assert cpu_threads(cores=4, load=0.0) == 4
    assert 1 <= cpu_threads() <= (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def test_task_is_deterministic_and_in_the_cot_format(tmp_path):
    first = make_task(tmp_path / "a", num_train=6, num_eval=2, seed=3, num_prompts=1)
    second = make_task(tmp_path / "b", num_train=6, num_eval=2, seed=3, num_prompts=1)
    for name in (
        "train.jsonl",
        "benchmark.jsonl",
        "prompts.jsonl",
        "meta.json",
        "images/00000.png",
        "images/00008.png",
    ):
        assert (first.root / name).read_bytes() == (second.root / name).read_bytes()
    # Prompt images come last: the training and benchmark images of a seed do not depend on them.
    third = make_task(tmp_path / "c", num_train=6, num_eval=2, seed=3)
    for name in ("train.jsonl", "benchmark.jsonl", "images/00007.png"):
        assert (first.root / name).read_bytes() == (third.root / name).read_bytes()

    meta = json.loads(first.meta.read_text())
    assert meta == {"shapes": {"root": "images", "annotation": "train.jsonl", "data_augment": False, "repeat_time": 1}}
    train = [json.loads(line) for line in first.train.read_text().splitlines()]
    assert len(train) == 6
    for record in train:
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\nYour task is to answer the question")
        # The answer format the judge reads with the `en` version: the final answer is the task's answer.
        assert judge(gpt["value"], gpt["value"].rsplit(": ", 1)[1], "en").correct
    assert train[0]["conversations"][1]["value"] == cot_answer(train[0]["conversations"][1]["value"].split(": ")[-1])
    benchmark = [json.loads(line) for line in first.benchmark.read_text().splitlines()]
    prompts = [json.loads(line) for line in first.prompts.read_text().splitlines()]
    assert len(benchmark) == 2 * len(QUESTION_TYPES) and len(prompts) == len(QUESTION_TYPES)
    assert [b["source"] for b in benchmark[:3]] == list(QUESTION_TYPES)
    images = [{r["image"] for r in records} for records in (benchmark, prompts)]
    images.append({"images/" + r["image"] for r in train})
    assert sum(map(len, images)) == len(set().union(*images)) == 6 + 2 + 1  # no image in two sets
    assert all((first.root / image).is_file() for image in images[0] | images[1])


def test_demo_pairs_come_from_the_ground_truth(tmp_path):
    from internvl_tune.demo.task import _ANSWERS, make_pairs

    task = make_task(tmp_path, num_train=9, num_eval=2, seed=1)
    pairs = make_pairs(task, seed=1)
    train = [json.loads(line) for line in (tmp_path / "pairs_train.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in task.train.read_text().splitlines()]
    assert len(train) == 9 and len(json.loads(pairs.eval_meta.read_text())) == 1
    for pair, record in zip(train, sft, strict=True):
        assert pair["chosen"] == record["conversations"][1]["value"] and pair["rejected"] != pair["chosen"]
        assert pair["question"] == record["conversations"][0]["value"]
        chosen, rejected = (judge(pair[k], "x", "en").answer for k in ("chosen", "rejected"))
        assert {chosen, rejected} <= set(_ANSWERS[pair["question_type"]])
        assert pair["rejected"] == cot_answer(rejected)
    held_out = [json.loads(line) for line in (tmp_path / "pairs_eval.jsonl").read_text().splitlines()]
    assert len(held_out) == 2 * len(QUESTION_TYPES)
    assert held_out[0]["question"] == task_prompt(json.loads(task.benchmark.read_text().splitlines()[0])["question"])


def test_demo_rl_answer_breakdown_by_hand(tmp_path):
    """Accuracy per right answer and the share of a type's questions answered with it, counted by hand."""
    demo_rl = _load_benchmark_script("demo_rl")
    records = [
        ("count", "two", "two"),
        ("count", "two", "four"),
        ("count", "four", "four"),
        ("count", "four", "four"),
        ("shape", "circle", "square"),
        ("shape", "square", "square"),
        ("colour", "red", "red"),
    ]
    lines = [
        json.dumps({"source": kind, "answer": answer, "answer_pred": pred, "correct": answer == pred})
        for kind, answer, pred in records
    ]
    (tmp_path / "responses.jsonl").write_text("\n".join(lines) + "\n")
    breakdown = demo_rl.answer_breakdown(tmp_path / "responses.jsonl")
    assert breakdown == {
        "count": {"four": (1.0, 0.75), "two": (0.5, 0.25)},
        "shape": {"circle": (0.0, 0.0), "square": (1.0, 1.0)},
    }
    row = {"seed": 3, "stage": "after RL", "by_answer": breakdown}
    table = demo_rl.format_answers([row, {**row, "by_answer": {"count": {}, "shape": {}}}])
    assert table.splitlines()[0] == "| seed | stage | count: four | count: two | shape: circle | shape: square |"
    assert table.splitlines()[2] == "| 3 | after RL | 100% (75%) | 50% (25%) | 0% (0%) | 100% (100%) |"
    assert table.splitlines()[3] == "| 3 | after RL | - | - | - | - |"
