"""The end-to-end demo: the whole post-training workflow on a synthetic shapes task and a tiny InternVL, on CPU.

Launch: `internvl-tune demo [--output-dir DIR] [--quick] [field=value ...]` (fields of `DemoSettings`).

Stages, each timed:

1. data: `make_task` draws the training, benchmark and prompt images; writes `data/meta.json` + `train.jsonl`,
   `benchmark.jsonl` and `prompts.jsonl` (task.py: questions in the chain-of-thought format).
2. model: a tokenizer trained on the task's texts and a random tiny InternVL, saved to `model/`.
3. eval_before: `eval` (evaluate/benchmark.py, the MPO chain-of-thought prompt, greedy) of the random model on
   the benchmark, into `eval_before/`.
4. train: the SFT recipe (`recipes/sft.py`) on `data/meta.json`, writing `run/final` and `run/metrics.jsonl`.
5. eval_sft: the benchmark again for `run/final`, into `eval_sft/`.
6. sample: `num_samples` answers of the SFT model to each question of the prompt set, with temperature
   (preference_data/sample.py, prompt version `en`), into `responses/`.
7. pairs: `build-pairs` (preference_data/pairs.py) judges them and pairs right with wrong (and with unparseable)
   answers, into `pairs/` (with `meta.json`). When no question got both a right and a wrong answer (the quick
   setting's barely trained model), MPO falls back to ground-truth pairs (`make_pairs`), and the report says so.
8. mpo: MPO (`recipes/mpo.py`, sigmoid + bco_pair + sft) from the SFT model with it as the reference, writing
   `mpo_run/final`.
9. eval_mpo: the benchmark for the MPO model (`eval_mpo/`), and its reward accuracy against the SFT model on
   held-out ground-truth pairs.
10. rl (`rl_steps` > 0; `rl_steps=0` skips it): online GSPO
   (`recipes/rl.py`) from the MPO model (the SFT model without MPO) on the count and shape questions of freshly
   drawn images (`rl_data/`): `rl_generations` responses a question sampled by the policy, rewarded 1 when the judge
   finds the right answer, group advantages, updates; writing `rl_run/final`.
11. eval_rl: the benchmark for the RL model (`eval_rl/`).

`report.json` holds the accuracies per question type before SFT, after SFT, after MPO and after RL, the loss and reward-margin
curves, the sampling and pair counts, the stage times and the settings; `curves.png` plots them (when matplotlib is
installed: `pip install "internvl-tune[plot]"`). The demo passes when the colour accuracy after SFT reaches
`pass_threshold` and MPO prefers the right answers on held-out pairs; in quick mode (a few steps, for tests) it
passes when the last SFT loss is below the first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from internvl_tune.config import DataArgs, ModelArgs, MPOArgs, MPOConfig, RLArgs, RLConfig, SFTConfig, TrainArgs
from internvl_tune.demo.task import QUESTION_TYPES, make_pairs, make_task, task_texts
from internvl_tune.errors import UserError
from internvl_tune.evaluate.benchmark import Question, evaluate_benchmark, load_benchmark
from internvl_tune.evaluate.preference import reward_accuracy
from internvl_tune.generation.base import SamplingParams
from internvl_tune.generation.hf import HFBackend
from internvl_tune.losses.rl import SCALE_REWARDS
from internvl_tune.model.load import load_model
from internvl_tune.model.prepare import sample_settings
from internvl_tune.plot import import_pyplot, save_figure
from internvl_tune.preference_data.pairs import build_pairs
from internvl_tune.preference_data.sample import sample_responses
from internvl_tune.recipes import mpo, rl, sft
from internvl_tune.testing.tiny import save_tiny_model
from internvl_tune.training.metrics import read_metrics

TEMPLATE = "internvl2_5"
RL_SEED_OFFSET = 104_729  # the RL prompt images are drawn with the demo seed plus this: a draw of their own

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
    """Benchmark images (every question type asked for each)."""
    num_prompts: int = 100
    """Prompt-set images, whose questions (every type for each) the SFT model answers to make preference pairs."""
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
    """Keep the random ViT fixed (its features already separate colours) and train the projector and the LLM. A step
    costs about the same either way; training the ViT at the LLM's learning rate fits the training images as well
    but answers held-out ones worse (seeds 0 and 1: count 36-37%, shape 19-41%, and seed 1's colour fell to 37%;
    benchmarks/RESULTS-demo-rl.md)."""
    eval_batch_size: int = 16
    """Questions per `generate` call."""
    max_new_tokens: int = 24
    """Longest answer in tokens (the task's answers take 17 and the end token)."""
    num_samples: int = 4
    """Answers sampled per prompt-set question."""
    sample_temperature: float = 1.0
    """Sampling temperature: high enough that a question gets right and wrong answers."""
    mpo_steps: int = 150
    """MPO optimizer steps on the pairs built from the sampled answers (0 = skip sampling, pairs and MPO)."""
    mpo_learning_rate: float = 5e-5
    """MPO peak learning rate. On seed 0, 150 steps from the SFT model: 5e-5 left the benchmark accuracy within a
    point of SFT's (70.3% -> 69.3%), 2e-4 and 5e-4 lowered it (to 60% and 62%); answers sampled at temperature 0.7
    instead of 1 gave 69% (5e-5) and 67% (1e-4)."""
    rl_steps: int = 40
    """Online RL steps after MPO (0 = no RL stage); each samples rl_prompts_per_step questions x rl_generations. Over
    seeds 0-5, on 1000 fresh benchmark images (benchmarks/demo_rl.py), the 40 steps raised the count and shape
    accuracy over the MPO model by 0.7 points on average (-0.2 to +1.7 a seed); the same questions with their answers
    given raise it by 4.0 (benchmarks/RESULTS-demo-rl.md says why RL takes so little of it)."""
    rl_prompts_per_step: int = 32
    """Prompt-set questions per RL step (one update each)."""
    rl_generations: int = 4
    """Responses sampled per question: the group of the advantage. At lr 5e-5, 32 questions x 4 did as well as 16 x 8
    (seed 2) and as 32 x 8 at twice the cost (seed 0)."""
    rl_learning_rate: float = 5e-5
    """RL learning rate (constant). At 1e-4 (16 questions x 8) the 40 steps lowered count and shape, by 1.4 points
    over seeds 0-2."""
    rl_num_prompts: int = 640
    """Images drawn for the RL prompts, apart from every other set: their 1280 count and shape questions are one pass
    of the 40 steps. (RL on the 100 prompt-set images that MPO's pairs came from learnt them, not the task: its reward
    rose, the benchmark did not.)"""
    rl_scale_rewards: str = "group"
    """The advantage's denominator (`rl.scale_rewards`): group (GRPO's group std, the official stage's), batch, none,
    or mean (MaxRL: weights a question by 1 / its pass rate)."""
    rl_question_types: tuple[str, ...] = ("count", "shape")
    """Question types RL trains on: those SFT leaves unsolved (colour questions, answered right every time, give
    groups of equal rewards: advantage 0, nothing to learn)."""
    pass_criterion: str = "colour_accuracy"
    """colour_accuracy: colour accuracy after SFT >= pass_threshold and, with MPO, held-out reward accuracy > 0.5;
    loss_decrease: last SFT loss < first."""
    pass_threshold: float = 0.9
    num_threads: int = 0
    """torch's CPU threads; 0: the free cores (`cpu_threads`), or OMP_NUM_THREADS when it is set."""

    def quick(self) -> DemoSettings:
        """A shortened copy for tests: a few steps on a few images; passes when the loss falls."""
        return dataclasses.replace(
            self,
            num_train=24,
            num_eval=4,
            num_prompts=4,
            max_steps=6,
            batch_size=4,
            num_samples=2,
            max_new_tokens=8,  # a barely trained model's answers are not parseable anyway
            mpo_steps=3,
            rl_steps=2,
            rl_num_prompts=4,
            rl_prompts_per_step=2,
            rl_generations=2,
            pass_criterion="loss_decrease",
        )


def run_demo(settings: DemoSettings) -> dict[str, Any]:
    """Run the demo as configured, print a summary table and write `output_dir/report.json`; returns the report.

    Runs on `settings.num_threads` CPU threads (restored afterwards). A Ctrl-C stops it with one line saying that it
    does not resume (the training stages' own advice, `train.resume_from_checkpoint=auto`, is for `sft` and `mpo`).
    """
    check_settings(settings)
    threads = settings.num_threads or (None if os.environ.get("OMP_NUM_THREADS") else cpu_threads())
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    logger.info("torch CPU threads: %d (%d cores available)", torch.get_num_threads(), available_cores())
    try:
        return _run_demo(settings)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"demo interrupted; it does not resume: the same command starts it over (in {settings.output_dir})"
        ) from None
    finally:
        torch.set_num_threads(previous_threads)


def check_settings(settings: DemoSettings) -> None:
    """Refuse a bad setting in one line naming the demo's field, before any stage runs (an RL setting would otherwise
    surface as the rl recipe's own field, after minutes of SFT and MPO)."""
    if settings.pass_criterion not in ("colour_accuracy", "loss_decrease"):
        raise UserError(f"pass_criterion must be colour_accuracy or loss_decrease, got {settings.pass_criterion!r}")
    if settings.num_threads < 0:
        raise UserError(f"num_threads must be >= 0 (0: the free cores), got {settings.num_threads}")
    if settings.rl_steps < 0:
        raise UserError(f"rl_steps must be >= 0 (0: no RL stage), got {settings.rl_steps}")
    if not settings.rl_steps:
        return
    for name in ("rl_prompts_per_step", "rl_generations", "rl_num_prompts"):
        if getattr(settings, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(settings, name)}")
    if settings.rl_learning_rate < 0:
        raise UserError(f"rl_learning_rate must be >= 0, got {settings.rl_learning_rate}")
    if settings.rl_scale_rewards not in SCALE_REWARDS:
        raise UserError(
            f"rl_scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {settings.rl_scale_rewards!r}"
        )
    unknown = sorted(set(settings.rl_question_types) - set(QUESTION_TYPES))
    if unknown or not settings.rl_question_types:
        raise UserError(
            f"rl_question_types must be some of {', '.join(QUESTION_TYPES)}, got {list(settings.rl_question_types)}"
        )


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one), not all the machine's."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have none
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_threads(cores: int | None = None, load: float | None = None) -> int:
    """CPU threads for torch: the available cores less those other processes keep busy (the 1-minute load
    average), at least one.

    Why not torch's default of one thread per core: each op splits its work over every thread and waits for the
    slowest, so a thread whose core another process holds stalls the op until the scheduler runs it. On a 2-core
    machine shared with other jobs (load 2-7), 40 SFT steps of the demo's model took 4 to 94 s at 2 threads and 5
    to 11 s at 1; on an idle machine every core is used.

    Example: 2 cores at load 0.1 -> 2; 2 cores at load 2.7 -> 1; 16 cores at load 3.2 -> 13.
    """
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows)
            load = 0.0
    return max(1, min(cores, round(cores - load)))


def _run_demo(settings: DemoSettings) -> dict[str, Any]:
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = time.perf_counter()

    stage = time.perf_counter()
    logger.info(
        "drawing %d training, %d benchmark and %d prompt images",
        settings.num_train,
        settings.num_eval,
        settings.num_prompts,
    )
    task = make_task(output_dir / "data", settings.num_train, settings.num_eval, settings.seed, settings.num_prompts)
    questions = load_benchmark(task.benchmark)
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
    before = evaluate(model_dir, questions, output_dir / "eval_before", settings)
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
    sft_model = Path(summary["final_model"])
    times["train"] = time.perf_counter() - stage

    stage = time.perf_counter()
    after = evaluate(sft_model, questions, output_dir / "eval_sft", settings)
    times["eval_sft"] = time.perf_counter() - stage

    preference = run_mpo_stages(task, sft_model, questions, output_dir, settings, times) if settings.mpo_steps else {}
    online = {}
    if settings.rl_steps:
        start_model = Path(preference["final_model"]) if preference else sft_model
        online = run_rl_stage(task, start_model, questions, output_dir, settings, times)
    times["total"] = time.perf_counter() - start

    losses = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    if settings.pass_criterion == "colour_accuracy":
        passed = after["accuracy"].get("colour", 0.0) >= settings.pass_threshold
        if preference:  # and MPO must prefer the right answers on held-out pairs
            passed = passed and preference["reward_accuracy"]["reward_accuracy"] > 0.5
    else:
        passed = len(losses) >= 2 and losses[-1] < losses[0]
    examples = [
        {**{k: q.record[k] for k in ("image", "question", "answer", "source")}, "before": b, "after": a}
        for q, b, a in zip(questions[:9], before["answers"], after["answers"], strict=False)
    ]
    for example, answer in zip(examples, preference.get("answers", ()), strict=False):
        example["after_mpo"] = answer
    for example, answer in zip(examples, online.get("answers", ()), strict=False):
        example["after_rl"] = answer
    report = {
        "passed": passed,
        "pass_criterion": settings.pass_criterion,
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "accuracy_after_mpo": preference.get("accuracy", {}),
        "accuracy_after_rl": online.get("accuracy", {}),
        "num_eval_questions": len(questions),
        "losses": losses,
        "seconds": {name: round(value, 2) for name, value in times.items()},
        "settings": dataclasses.asdict(settings),
        "examples": examples,
        "final_model": str(sft_model),
        "mpo": {k: v for k, v in preference.items() if k not in ("accuracy", "answers")},
        "rl": {k: v for k, v in online.items() if k not in ("accuracy", "answers")},
    }
    report["plot"] = plot_curves(report, output_dir / "curves.png")
    (output_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(format_report(report))
    print(f"report: {output_dir / 'report.json'}")
    return report


def data_args(settings: DemoSettings, meta_path: str | Path) -> DataArgs:
    """The data settings of the demo's runs; evaluation and sampling render their prompts with the same."""
    return DataArgs(
        meta_path=str(meta_path),
        conv_style=TEMPLATE,
        system_message=settings.system_message,
        max_dynamic_patch=settings.max_dynamic_patch,
    )


def later_stage_model(path: Path) -> ModelArgs:
    """The model settings of the stages after SFT (MPO, RL): from `path`, the ViT frozen, no DropPath."""
    return ModelArgs(model_name_or_path=str(path), grad_checkpoint=False, freeze_backbone=True, drop_path_rate=0.0)


def demo_backend(model_dir: Path, settings: DemoSettings) -> HFBackend:
    """The `hf` generation backend for a model of the demo, its prompts built with the demo's training settings."""
    model, tokenizer = load_model(model_dir)
    prompt_settings = sample_settings(data_args(settings, meta_path=""), model.config)  # as in training
    return HFBackend(model, tokenizer, prompt_settings, batch_size=settings.eval_batch_size)


def evaluate(model_dir: Path, questions: Sequence[Question], out: Path, settings: DemoSettings) -> dict[str, Any]:
    """`eval --prompt cot` of the model in `model_dir` on the benchmark: greedy answers judged by the judge, written
    to `out`; returns the responses in benchmark order and the accuracy per question type and overall."""
    shutil.rmtree(out, ignore_errors=True)  # an earlier demo's answers, of other weights: not to be resumed
    report = evaluate_benchmark(
        demo_backend(model_dir, settings),
        list(questions),
        out,
        prompt="cot",
        max_new_tokens=settings.max_new_tokens,
        settings={"model": str(model_dir)},
    )
    rows = sorted(map(json.loads, (out / "responses.jsonl").read_text().splitlines()), key=lambda r: r["index"])
    accuracy = {kind: report["per_source"][kind]["accuracy"] for kind in QUESTION_TYPES if kind in report["per_source"]}
    return {"answers": [r["response"] for r in rows], "accuracy": {**accuracy, "overall": report["accuracy"]}}


def run_mpo_stages(
    task, sft_model: Path, questions: Sequence[Question], output_dir: Path, settings: DemoSettings, times: dict
) -> dict[str, Any]:
    """Sample answers of the SFT model, pair them by correctness, MPO from the SFT model, evaluate the result."""
    stage = time.perf_counter()
    responses = output_dir / "responses"
    shutil.rmtree(responses, ignore_errors=True)  # sampling resumes: an earlier demo's answers would count
    params = SamplingParams(
        n=settings.num_samples,
        temperature=settings.sample_temperature,
        top_k=0,
        max_new_tokens=settings.max_new_tokens,
        seed=settings.seed,
    )
    sampled = sample_responses(
        demo_backend(sft_model, settings), task.prompts, responses, params=params, prompt_version="en"
    )
    times["sample"] = time.perf_counter() - stage

    stage = time.perf_counter()
    pairs = build_pairs([sampled.output], output_dir / "pairs", seed=settings.seed, image_root=task.root)
    print(pairs.format())
    truth_pairs = make_pairs(task, settings.seed)
    meta, num_pairs = pairs.meta_path, pairs.num_pairs
    if meta is None:
        logger.warning("no question got both a right and a wrong answer: MPO on ground-truth pairs instead")
        meta, num_pairs = truth_pairs.train_meta, truth_pairs.num_train
    times["pairs"] = time.perf_counter() - stage

    stage = time.perf_counter()
    run_dir = output_dir / "mpo_run"
    data = data_args(settings, meta)
    config = MPOConfig(
        model=later_stage_model(sft_model),
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
    mpo_model = Path(summary["final_model"])
    times["mpo"] = time.perf_counter() - stage

    stage = time.perf_counter()
    result = evaluate(mpo_model, questions, output_dir / "eval_mpo", settings)
    held_out = data_args(settings, truth_pairs.eval_meta)
    rewards = reward_accuracy(mpo_model, sft_model, held_out, beta=config.mpo.beta, batch_size=settings.eval_batch_size)
    times["eval_mpo"] = time.perf_counter() - stage
    rows = read_metrics(run_dir / "metrics.jsonl")
    counts = pairs.datasets[0]
    return {
        **result,
        "sampling": {
            "num_questions": sampled.num_requests,
            "num_responses": sampled.num_written,
            "num_correct": counts.num_correct,
            "num_incorrect": counts.num_incorrect,
            "num_unparseable": counts.num_unparseable,
        },
        "pairs": {
            "num_pairs": num_pairs,  # in the data MPO trained on
            "source": "sampled" if pairs.meta_path else "ground truth (no sampled pairs)",
            "sampled": counts.num_pairs,  # by kind (build-pairs' correctness and format pairs)
        },
        "reward_accuracy": rewards,
        "losses": [row["loss"] for row in rows],
        "reward_margins": [row["rewards/margins"] for row in rows],
        "train_reward_accuracy": [row["rewards/accuracies"] for row in rows],
        "final_model": str(mpo_model),
    }


def run_rl_stage(
    task, start_model: Path, questions: Sequence[Question], output_dir: Path, settings: DemoSettings, times: dict
) -> dict[str, Any]:
    """Online GSPO from `start_model` on the `rl_question_types` questions of `rl_num_prompts` freshly drawn images
    (neither the training, benchmark nor MPO prompt images), rewarded by the judge's accuracy; then the benchmark
    for the result."""
    stage = time.perf_counter()
    run_dir = output_dir / "rl_run"
    # Fresh images (their own seed), their questions of rl_question_types only.
    rl_task = make_task(output_dir / "rl_data", 0, 0, settings.seed + RL_SEED_OFFSET, settings.rl_num_prompts)
    lines = rl_task.prompts.read_text().splitlines()
    lines = [line for line in lines if json.loads(line)["source"] in settings.rl_question_types]
    if not lines:
        raise UserError(f"rl_question_types {settings.rl_question_types}: no such question in {rl_task.prompts}")
    (rl_task.root / "rl_prompts.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"shapes_rl_prompts": {"root": ".", "annotation": "rl_prompts.jsonl", "repeat_time": 1}}
    (rl_task.root / "rl_prompts_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    data = dataclasses.replace(data_args(settings, rl_task.root / "rl_prompts_meta.json"), max_seq_length=1024)
    config = RLConfig(
        model=later_stage_model(start_model),
        data=data,
        train=TrainArgs(
            output_dir=str(run_dir),
            overwrite_output_dir=True,
            max_steps=settings.rl_steps,
            per_device_train_batch_size=settings.rl_prompts_per_step,
            learning_rate=settings.rl_learning_rate,
            lr_scheduler_type="constant",
            warmup_ratio=0.0,
            seed=settings.seed,
        ),
        rl=RLArgs(
            num_generations=settings.rl_generations,
            scale_rewards=settings.rl_scale_rewards,
            prompts_per_step=settings.rl_prompts_per_step,
            mini_batch_size=settings.rl_prompts_per_step,
            max_new_tokens=settings.max_new_tokens,
            prompt_version="en",  # as the sampling stage asks: think, then "Final answer: ..."
            rewards=["accuracy"],
            reward_weights=[1.0],
            rollout_batch_size=settings.rl_prompts_per_step * settings.rl_generations,
            log_rollouts=True,  # rl_run/rollouts/: what each step sampled and how the judge scored it
        ),
    )
    config.validate()
    summary = rl.train(config)
    rl_model = Path(summary["final_model"])
    times["rl"] = time.perf_counter() - stage

    stage = time.perf_counter()
    result = evaluate(rl_model, questions, output_dir / "eval_rl", settings)
    times["eval_rl"] = time.perf_counter() - stage
    rows = read_metrics(run_dir / "metrics.jsonl")
    return {
        **result,
        "start_model": str(start_model),
        "rewards": [row["reward/mean"] for row in rows],
        "zero_variance_groups": [row["zero_variance_groups"] for row in rows],
        "final_model": str(rl_model),
    }


def plot_curves(report: dict[str, Any], path: Path) -> str | None:
    """`path`: the SFT and MPO loss, the MPO reward margin per step, and the accuracy per question type at each
    stage, side by side; None (with a warning) when matplotlib is not installed."""
    try:
        plt = import_pyplot()
    except UserError as e:
        logger.warning("no %s: %s", path.name, e)
        return None
    mpo_run = report["mpo"]
    fig, (loss, margin, accuracy) = plt.subplots(1, 3, figsize=(15, 4))
    loss.plot(range(1, len(report["losses"]) + 1), report["losses"], label="SFT")
    if mpo_run:
        loss.plot(range(1, len(mpo_run["losses"]) + 1), mpo_run["losses"], label="MPO")
        margin.plot(range(1, len(mpo_run["reward_margins"]) + 1), mpo_run["reward_margins"])
    loss.set(title="training loss", xlabel="step", yscale="log")
    loss.legend()
    margin.set(title="MPO reward margin (chosen - rejected)", xlabel="step")
    stages, results = ["before SFT", "after SFT"], [report["accuracy_before"], report["accuracy_after"]]
    for name, key in (("after MPO", "accuracy_after_mpo"), ("after RL", "accuracy_after_rl")):
        if report.get(key):
            stages.append(name)
            results.append(report[key])
    for kind in (*QUESTION_TYPES, "overall"):
        accuracy.plot(stages, [r.get(kind, 0.0) for r in results], marker="o", label=kind)
    accuracy.set(title="benchmark accuracy (judge, CoT prompt)", ylim=(-0.05, 1.05))
    accuracy.legend()
    fig.tight_layout()
    return str(save_figure(fig, path))


def format_report(report: dict[str, Any]) -> str:
    """A short table: accuracy per question type before SFT, after SFT and after MPO, loss, times, verdict."""
    columns = {"before": report["accuracy_before"], "after SFT": report["accuracy_after"]}
    if report["accuracy_after_mpo"]:
        columns["after MPO"] = report["accuracy_after_mpo"]
    if report.get("accuracy_after_rl"):
        columns["after RL"] = report["accuracy_after_rl"]
    lines = [f"{'question type':<14}" + "".join(f"{name:>11}" for name in columns)]
    lines += [
        f"{kind:<14}" + "".join(f"{accuracy.get(kind, 0.0):>11.1%}" for accuracy in columns.values())
        for kind in report["accuracy_after"]
    ]
    losses = report["losses"]
    if losses:
        lines.append(f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    if report["mpo"]:
        m = report["mpo"]
        lines.append(
            f"MPO on {m['pairs']['num_pairs']} pairs ({m['pairs']['source']}) from "
            f"{m['sampling']['num_responses']} sampled answers; held-out reward accuracy "
            f"{m['reward_accuracy']['reward_accuracy']:.1%}"
        )
    if report.get("rl"):
        rewards = report["rl"]["rewards"]
        # One step's mean reward (32 questions) moves by several points from noise alone: compare a tenth of the run.
        span = max(1, len(rewards) // 10)
        first, last = sum(rewards[:span]) / span, sum(rewards[-span:]) / span
        steps = f"{span} steps" if span > 1 else "step"
        lines.append(
            f"RL mean reward {first:.1%} (first {steps}) -> {last:.1%} (last {steps}) over {len(rewards)} steps"
        )
    lines.append("time " + ", ".join(f"{name} {seconds:.0f}s" for name, seconds in report["seconds"].items()))
    if report.get("plot"):
        lines.append(f"plot: {report['plot']}")
    lines.append(f"{'PASSED' if report['passed'] else 'FAILED'} ({report['pass_criterion']})")
    return "\n".join(lines)
