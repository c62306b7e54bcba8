"""The end-to-end demo: synthetic shapes task -> tiny InternVL -> evaluate -> SFT -> evaluate again, on CPU.

Launch: `internvl-tune demo [--output-dir DIR] [--quick] [field=value ...]` (fields of `DemoSettings`).

Stages, each timed:

1. data: `make_task` draws the training and held-out images and writes `data/meta.json` + `train.jsonl`.
2. model: a tokenizer trained on the task's texts and a random tiny InternVL, saved to `model/`.
3. eval_before: greedy answers to every held-out question, exact match after normalisation.
4. train: the SFT recipe (`recipes/sft.py`) on `data/meta.json`, writing `run/final` and `run/metrics.jsonl`.
5. eval_after: the same questions for `run/final`.
6. mpo: preference pairs from the task's ground truth (the right answer chosen, a wrong one of the same type
   rejected), MPO (`recipes/mpo.py`, sigmoid + bco_pair + sft) from the SFT model with it as the reference,
   writing `mpo_run/final`.
7. eval_mpo: reward accuracy of the MPO model against the SFT model on held-out pairs (0 before MPO: a policy
   equal to its reference has zero rewards), and the held-out questions again.

`report.json` holds the accuracies per question type before and after, the per-step loss curve, the stage times
and the settings. The demo passes when the colour accuracy after training reaches `pass_threshold`; in quick mode
(a few steps, for tests) it passes when the last loss is below the first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from internvl_tune.config import DataArgs, ModelArgs, MPOArgs, MPOConfig, SFTConfig, TrainArgs
from internvl_tune.demo.task import QUESTION_TYPES, make_pairs, make_task, normalize_answer, read_eval, task_texts
from internvl_tune.evaluate.generate import answer_questions
from internvl_tune.evaluate.preference import reward_accuracy
from internvl_tune.model.load import load_model
from internvl_tune.model.prepare import sample_settings
from internvl_tune.recipes import mpo, sft
from internvl_tune.testing.tiny import save_tiny_model
from internvl_tune.training.metrics import read_metrics

TEMPLATE = "internvl2_5"

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """Everything the demo does; the defaults finish in minutes on a 2-core CPU."""

    output_dir: str = "demo_out"
    """Where data/, model/, run/ and report.json go."""
    seed: int = 0
    """Seed of the task, the model weights and the training order."""
    num_train: int = 4000
    """Training images (one question each, question types in turn)."""
    num_eval: int = 100
    """Held-out images (every question type asked for each)."""
    image_size: int = 112
    """Tile side in pixels: patch 14, so 64 patches and 16 image tokens per tile (56 px tiles, 4 tokens, learn
    colour much less reliably)."""
    max_dynamic_patch: int = 2
    """Most tiles per image: wide and tall images become 2 tiles plus a thumbnail."""
    vision_hidden_size: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden_size: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    system_message: str = "You are a helpful assistant."
    """A short system message (the template default costs about a hundred tokens per sample)."""
    max_steps: int = 1500
    """Optimizer steps (3 epochs of the default 4000 images at batch size 8)."""
    batch_size: int = 8
    """Samples per step."""
    learning_rate: float = 5e-4
    """Peak learning rate (cosine schedule after warmup). At 1e-3 and above the model settles on the answer prior
    and often never learns to look at the image tokens."""
    warmup_ratio: float = 0.05
    freeze_backbone: bool = True
    """Keep the random ViT fixed (its features already separate colours) and train the projector and the LLM:
    faster, and more reliable than training the ViT at the LLM's learning rate."""
    eval_batch_size: int = 16
    """Questions per `generate` call."""
    max_new_tokens: int = 6
    """Longest answer in tokens."""
    mpo_steps: int = 150
    """MPO optimizer steps on the ground-truth pairs (0 = skip the MPO stage)."""
    mpo_learning_rate: float = 5e-5
    """MPO peak learning rate."""
    pass_criterion: str = "colour_accuracy"
    """colour_accuracy: colour accuracy after SFT >= pass_threshold and, with MPO, held-out reward accuracy > 0.5;
    loss_decrease: last SFT loss < first."""
    pass_threshold: float = 0.9

    def quick(self) -> DemoSettings:
        """A shortened copy for tests: a few steps on a few images; passes when the loss falls."""
        return dataclasses.replace(
            self, num_train=24, num_eval=4, max_steps=6, batch_size=4, mpo_steps=3, pass_criterion="loss_decrease"
        )


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run the demo as configured, print a summary table and write `output_dir/report.json`; returns the report."""
    if settings.pass_criterion not in ("colour_accuracy", "loss_decrease"):
        raise ValueError(f"pass_criterion must be colour_accuracy or loss_decrease, got {settings.pass_criterion!r}")
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = time.perf_counter()

    stage = time.perf_counter()
    logger.info("drawing %d training and %d held-out images", settings.num_train, settings.num_eval)
    task = make_task(output_dir / "data", settings.num_train, settings.num_eval, settings.seed)
    items = read_eval(task)
    times["data"] = time.perf_counter() - stage

    stage = time.perf_counter()
    model_dir = output_dir / "model"
    logger.info("building a random tiny InternVL in %s", model_dir)
    save_tiny_model(
        model_dir,
        extra_texts=[*task_texts(), settings.system_message],
        seed=settings.seed,
        image_size=settings.image_size,
        vision_hidden_size=settings.vision_hidden_size,
        vision_layers=settings.vision_layers,
        vision_heads=settings.vision_heads,
        text_hidden_size=settings.text_hidden_size,
        text_layers=settings.text_layers,
        text_heads=settings.text_heads,
        text_kv_heads=settings.text_kv_heads,
    )
    times["model"] = time.perf_counter() - stage

    stage = time.perf_counter()
    before = evaluate(model_dir, items, settings, desc="eval before")
    times["eval_before"] = time.perf_counter() - stage

    stage = time.perf_counter()
    run_dir = output_dir / "run"
    config = SFTConfig(
        model=ModelArgs(
            model_name_or_path=str(model_dir), grad_checkpoint=False, freeze_backbone=settings.freeze_backbone
        ),
        data=data_args(settings, task.meta),
        train=TrainArgs(
            output_dir=str(run_dir),
            overwrite_output_dir=True,  # the stage of an earlier demo in the same folder
            max_steps=settings.max_steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="cosine",
            warmup_ratio=settings.warmup_ratio,
            seed=settings.seed,
        ),
    )
    config.validate()
    summary = sft.train(config)
    times["train"] = time.perf_counter() - stage

    stage = time.perf_counter()
    after = evaluate(Path(summary["final_model"]), items, settings, desc="eval after")
    times["eval_after"] = time.perf_counter() - stage

    preference = (
        run_mpo_stage(task, Path(summary["final_model"]), output_dir, settings, times) if settings.mpo_steps else {}
    )
    times["total"] = time.perf_counter() - start

    losses = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    if settings.pass_criterion == "colour_accuracy":
        passed = after["accuracy"].get("colour", 0.0) >= settings.pass_threshold
        if preference:  # and MPO must prefer the right answers on held-out pairs
            passed = passed and preference["reward_accuracy_after"]["reward_accuracy"] > 0.5
    else:
        passed = len(losses) >= 2 and losses[-1] < losses[0]
    report = {
        "passed": passed,
        "pass_criterion": settings.pass_criterion,
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "num_eval_questions": len(items),
        "losses": losses,
        "seconds": {name: round(value, 2) for name, value in times.items()},
        "settings": dataclasses.asdict(settings),
        "examples": [
            {**item, "before": b, "after": a}
            for item, b, a in zip(items[:9], before["answers"], after["answers"], strict=False)
        ],
        "final_model": summary["final_model"],
        "mpo": preference,
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(format_report(report))
    print(f"report: {output_dir / 'report.json'}")
    return report


def data_args(settings: DemoSettings, meta_path: str | Path) -> DataArgs:
    """The data settings of the demo's runs; evaluation renders its prompts with the same."""
    return DataArgs(
        meta_path=str(meta_path),
        conv_style=TEMPLATE,
        system_message=settings.system_message,
        max_dynamic_patch=settings.max_dynamic_patch,
    )


def run_mpo_stage(task, sft_model: Path, output_dir: Path, settings: DemoSettings, times: dict[str, float]) -> dict:
    """MPO from the SFT model on ground-truth pairs; reward accuracy on held-out pairs and QA accuracy after."""
    stage = time.perf_counter()
    pairs = make_pairs(task, settings.seed)
    run_dir = output_dir / "mpo_run"
    data = data_args(settings, pairs.train_meta)
    config = MPOConfig(
        model=ModelArgs(
            model_name_or_path=str(sft_model), grad_checkpoint=False, freeze_backbone=True, drop_path_rate=0.0
        ),
        data=data,
        train=TrainArgs(
            output_dir=str(run_dir),
            overwrite_output_dir=True,
            max_steps=settings.mpo_steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.mpo_learning_rate,
            weight_decay=0.05,
            warmup_ratio=settings.warmup_ratio,
            seed=settings.seed,
        ),
        mpo=MPOArgs(),
    )
    config.validate()
    summary = mpo.train(config)
    times["mpo"] = time.perf_counter() - stage

    stage = time.perf_counter()
    held_out = dataclasses.replace(data, meta_path=str(pairs.eval_meta))
    before = reward_accuracy(sft_model, sft_model, held_out, beta=config.mpo.beta, batch_size=settings.eval_batch_size)
    after = reward_accuracy(
        Path(summary["final_model"]), sft_model, held_out, beta=config.mpo.beta, batch_size=settings.eval_batch_size
    )
    questions = evaluate(Path(summary["final_model"]), read_eval(task), settings, desc="eval after mpo")
    times["eval_mpo"] = time.perf_counter() - stage
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {
        "reward_accuracy_before": before,
        "reward_accuracy_after": after,
        "accuracy_after_mpo": questions["accuracy"],
        "losses": [row["loss"] for row in rows],
        "train_reward_accuracy": [row["rewards/accuracies"] for row in rows],
        "final_model": summary["final_model"],
    }


def evaluate(model_dir: Path, items: Sequence[dict[str, str]], settings: DemoSettings, *, desc: str) -> dict[str, Any]:
    """Greedy answers of the model in `model_dir` to the held-out questions, and the accuracy per question type."""
    model, tokenizer = load_model(model_dir)
    prompt_settings = sample_settings(data_args(settings, meta_path=""), model.config)  # as in training
    answers: list[str] = []
    chunk = settings.eval_batch_size
    for first in tqdm(range(0, len(items), chunk), desc=desc, unit="batch"):
        answers += answer_questions(
            model,
            tokenizer,
            items[first : first + chunk],
            prompt_settings,
            max_new_tokens=settings.max_new_tokens,
            batch_size=chunk,
        )
    return {"answers": answers, "accuracy": accuracy(items, answers)}


def accuracy(items: Sequence[dict[str, str]], answers: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per question type and overall, after `normalize_answer`.

    Example: answers "Red." and "two" to a colour question (red) and a count question (three) give
    `{"colour": 1.0, "count": 0.0, "overall": 0.5}`; a question type with no questions is left out.
    """
    correct: dict[str, list[bool]] = {}
    for item, answer in zip(items, answers, strict=True):
        correct.setdefault(item["question_type"], []).append(
            normalize_answer(answer) == normalize_answer(item["answer"])
        )
    result = {kind: sum(hits) / len(hits) for kind in QUESTION_TYPES if (hits := correct.get(kind))}
    everything = [hit for hits in correct.values() for hit in hits]
    result["overall"] = sum(everything) / len(everything) if everything else 0.0
    return result


def format_report(report: dict[str, Any]) -> str:
    """A short table: accuracy per question type before and after training, loss, times, verdict."""
    before, after = report["accuracy_before"], report["accuracy_after"]
    lines = [f"{'question type':<14}{'before':>8}{'after':>8}"]
    lines += [f"{kind:<14}{before[kind]:>8.1%}{after[kind]:>8.1%}" for kind in after]
    losses = report["losses"]
    if losses:
        lines.append(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    lines.append("time " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in report["seconds"].items()))
    if report.get("mpo"):
        m = report["mpo"]
        lines.append(
            f"MPO: held-out reward accuracy {m['reward_accuracy_before']['reward_accuracy']:.1%} -> "
            f"{m['reward_accuracy_after']['reward_accuracy']:.1%}; colour accuracy after MPO "
            f"{m['accuracy_after_mpo'].get('colour', 0):.1%}"
        )
    lines.append(f"{'PASSED' if report['passed'] else 'FAILED'} ({report['pass_criterion']})")
    return "\n".join(lines)
