"""The demo's RL stage against what its model can learn: each stage on a large fresh benchmark, and a supervised
ceiling for the RL stage.

Run (CPU; DIR is the output folder of `internvl-tune demo ... rl_steps=N`, one per seed)::

    .venv/bin/python benchmarks/demo_rl.py /tmp/demo0 /tmp/demo1 /tmp/demo2         # -> stdout, markdown
    .venv/bin/python benchmarks/demo_rl.py --num-eval 50 DIR                          # a quick look

Why: the demo's own benchmark has 100 images, so one question type's accuracy has a standard error of about 5
points, too coarse to see what an RL stage of a few minutes does. Here every model of a demo folder (after SFT,
after MPO, after RL) answers `--num-eval` freshly drawn images (every question type each; 1000 by default, a standard
error of about 1.6 points a type), drawn with a seed apart from every set of the demo. A second table breaks count
and shape down by right answer: each answer's accuracy and how often the model gave it, which tells a stage that
learns to tell the answers apart from one that moves its prior toward the answers it already gets right.

The ceiling (`supervised ceiling`): the MPO model trained, as SFT, on as many of the RL stage's questions as it
consumed (`rl_steps x rl_prompts_per_step`, the first ones of its prompt file: the same images and question types),
one pass, batch `rl_prompts_per_step`, the RL learning rate, constant, with the right answer given instead of a
reward. An RL step learns from its sampled answers and a 0/1 reward what this step is told outright. So where the
ceiling stays where MPO left the accuracy, the model limits it and RL cannot be expected to raise it either; where
the ceiling rises and RL does not, the RL is what falls short.

The settings of each folder (image size, tiles, system message, RL settings) are read from its `report.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from internvl_tune.cli import drop_deepspeed_cpu_notice
from internvl_tune.config import SFTConfig, TrainArgs
from internvl_tune.demo.run import DemoSettings, data_args, evaluate, later_stage_model
from internvl_tune.demo.task import QUESTION_TYPES, make_task, sft_record
from internvl_tune.errors import UserError
from internvl_tune.evaluate.benchmark import load_benchmark
from internvl_tune.recipes import sft

EVAL_SEED = 424_242  # the large benchmark's images: a draw apart from the demo's (seed, seed + RL_SEED_OFFSET)
logger = logging.getLogger("demo_rl")
BREAKDOWN_TYPES = DemoSettings.rl_question_types  # the question types the demo's RL stage trains on
STAGES = {"after SFT": "run/final", "after MPO": "mpo_run/final", "after RL": "rl_run/final"}


def demo_settings(demo_dir: Path) -> DemoSettings:
    """The settings a demo folder ran with (its report.json)."""
    report = demo_dir / "report.json"
    if not demo_dir.is_dir():
        raise UserError(f"{demo_dir}: no such folder")
    if not report.is_file():
        raise UserError(f"{demo_dir}: no report.json; give the output folder of a finished `internvl-tune demo`")
    try:
        content = json.loads(report.read_text())
    except ValueError as e:
        raise UserError(f"{report}: not JSON ({e})") from None
    values = content.get("settings") if isinstance(content, dict) else None
    if not isinstance(values, dict):
        raise UserError(f"{report}: no settings in it; give the output folder of a finished `internvl-tune demo`")
    known = {f.name for f in dataclasses.fields(DemoSettings)}  # a field an older or newer demo wrote is left out
    values = {name: value for name, value in values.items() if name in known}
    if "rl_question_types" in values:
        values["rl_question_types"] = tuple(values["rl_question_types"])
    settings = DemoSettings(**values)
    numbers = {"seed": int, "rl_steps": int, "rl_prompts_per_step": int, "rl_learning_rate": (int, float)}
    for name, kind in numbers.items():
        if not isinstance(getattr(settings, name), kind):
            raise UserError(f"{report}: settings.{name} is {getattr(settings, name)!r}, not a number")
    return settings


def supervised_ceiling(demo_dir: Path, settings: DemoSettings, work: Path) -> Path:
    """Train the MPO model on the RL stage's questions with their answers (module docstring); returns the model."""
    rl_data = demo_dir / "rl_data"
    if not (rl_data / "rl_prompts.jsonl").is_file():
        raise UserError(
            f"{demo_dir}: no rl_data/rl_prompts.jsonl, the RL stage's questions (--no-ceiling goes without)"
        )
    lines = (rl_data / "rl_prompts.jsonl").read_text().splitlines()
    num_questions = settings.rl_steps * settings.rl_prompts_per_step
    if len(lines) < num_questions:
        # The RL stage went over its prompts more than once; one pass over them is what this ceiling measures.
        logger.warning("%s: %d RL questions, fewer than the %d RL consumed", demo_dir, len(lines), num_questions)
    items = [json.loads(line) for line in lines[:num_questions]]
    records = [sft_record(f"rl-{i}", item["image"], item["question"], item["answer"]) for i, item in enumerate(items)]
    work.mkdir(parents=True, exist_ok=True)
    annotation = work / "supervised.jsonl"
    annotation.write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = work / "supervised_meta.json"
    meta.write_text(
        json.dumps(
            {
                "shapes_rl_supervised": {
                    "root": str(rl_data.resolve()),
                    "annotation": str(annotation),
                    "data_augment": False,
                }
            }
        )
    )
    config = SFTConfig(
        model=later_stage_model(demo_dir / STAGES["after MPO"]),
        data=data_args(settings, meta),
        train=TrainArgs(
            output_dir=str(work / "run"),
            overwrite_output_dir=True,
            max_steps=max(1, len(records) // settings.rl_prompts_per_step),
            per_device_train_batch_size=settings.rl_prompts_per_step,
            learning_rate=settings.rl_learning_rate,
            lr_scheduler_type="constant",
            warmup_ratio=0.0,
            seed=settings.seed,
        ),
    )
    config.validate()
    return Path(sft.train(config)["final_model"])


def measure(demo_dir: Path, num_eval: int, with_ceiling: bool) -> list[dict[str, Any]]:
    """Accuracy rows (seed, stage, per type, count+shape mean) of one demo folder on the large benchmark, which is
    drawn into `demo_dir/demo_rl_benchmark/` with the answers and the ceiling's run."""
    demo_dir = demo_dir.resolve()  # the meta files written below name absolute paths
    settings = demo_settings(demo_dir)
    models = {stage: demo_dir / path for stage, path in STAGES.items() if (demo_dir / path).is_dir()}
    if not models:
        raise UserError(f"{demo_dir}: none of {', '.join(STAGES.values())} is there (did the demo finish?)")
    if "after RL" not in models:
        logger.info("%s: no rl_run/final (a demo with rl_steps=0): no RL stage and no ceiling", demo_dir)
    work = demo_dir / "demo_rl_benchmark"
    bench = make_task(work / f"benchmark_{num_eval}", 0, num_eval, EVAL_SEED, 0)
    questions = load_benchmark(bench.benchmark)
    if with_ceiling and "after RL" in models:
        models["supervised ceiling"] = supervised_ceiling(demo_dir, settings, work / "supervised")
    rows = []
    for stage, model in models.items():
        slug = stage.replace(" ", "_")
        eval_dir = work / f"eval_{num_eval}_{slug}"
        accuracy = evaluate(model, questions, eval_dir, settings)["accuracy"]
        by_answer = answer_breakdown(eval_dir / "responses.jsonl")
        rows.append({"seed": settings.seed, "stage": stage, **accuracy, "by_answer": by_answer})
        logger.info("%s %s: %s", demo_dir, stage, accuracy)
    return rows


def answer_breakdown(responses: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """Per count / shape right answer of an eval's responses.jsonl: (accuracy on the questions with that answer,
    share of that type's questions the model answered with it)."""
    records = [json.loads(line) for line in responses.read_text().splitlines()]
    breakdown = {}
    for kind in BREAKDOWN_TYPES:
        of_kind = [r for r in records if r["source"] == kind]
        answers = sorted({r["answer"] for r in of_kind})
        breakdown[kind] = {
            answer: (
                sum(r["correct"] for r in of_kind if r["answer"] == answer)
                / sum(r["answer"] == answer for r in of_kind),
                sum(r["answer_pred"] == answer for r in of_kind) / len(of_kind),
            )
            for answer in answers
        }
    return breakdown


def format_answers(rows: list[dict[str, Any]]) -> str:
    """A markdown table of each row's count and shape breakdown: `accuracy (share answered)` per right answer."""
    columns = [
        (kind, answer)
        for kind in BREAKDOWN_TYPES
        for answer in sorted({answer for row in rows for answer in row["by_answer"][kind]})
    ]
    lines = [
        "| seed | stage | " + " | ".join(f"{kind}: {answer}" for kind, answer in columns) + " |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for row in rows:
        cells = []
        for kind, answer in columns:
            if answer in row["by_answer"][kind]:
                accuracy, share = row["by_answer"][kind][answer]
                cells.append(f"{accuracy:.0%} ({share:.0%})")
            else:  # no question of this row's benchmark has that answer
                cells.append("-")
        lines.append(f"| {row['seed']} | {row['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows, then the mean over the seeds of each stage."""
    header = "| seed | stage | " + " | ".join(QUESTION_TYPES) + " | count + shape |"
    lines = [header, "|" + "---|" * (len(QUESTION_TYPES) + 3)]

    def line(seed: str, stage: str, row: dict[str, float]) -> str:
        cells = " | ".join(f"{row[kind]:.1%}" for kind in QUESTION_TYPES)
        return f"| {seed} | {stage} | {cells} | {(row['count'] + row['shape']) / 2:.1%} |"

    lines += [line(str(row["seed"]), row["stage"], row) for row in rows]
    for stage in dict.fromkeys(row["stage"] for row in rows):
        of_stage = [row for row in rows if row["stage"] == stage]
        if len(of_stage) > 1:
            mean = {kind: sum(row[kind] for row in of_stage) / len(of_stage) for kind in QUESTION_TYPES}
            lines.append(line(f"mean of {len(of_stage)}", stage, mean))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_dirs", nargs="+", type=Path, help="output folders of `internvl-tune demo rl_steps=N`")
    parser.add_argument("--num-eval", type=int, default=1000, help="fresh benchmark images (every question type)")
    parser.add_argument("--no-ceiling", action="store_true", help="evaluate the stages only, no supervised ceiling")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.num_eval < 1:
        parser.error(f"--num-eval must be >= 1, got {args.num_eval}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("DeepSpeed").addFilter(drop_deepspeed_cpu_notice)  # stdout is the table
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, failed = [], []
    for demo_dir in args.demo_dirs:  # a folder that fails does not cost the others' results
        try:
            rows += measure(demo_dir, args.num_eval, not args.no_ceiling)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(demo_dir)
    if rows:
        print(
            f"Each stage on {args.num_eval} fresh images x {len(QUESTION_TYPES)} question types (seed {EVAL_SEED}):\n"
        )
        print(format_rows(rows))
        print(
            "\nCount and shape by right answer: accuracy on its questions (share of the type's answers given as it):\n"
        )
        print(format_answers(rows))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
