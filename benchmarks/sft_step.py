"""One SFT training step, side by side: our recipe (`internvl_tune.recipes.sft.train`) and TRL's `SFTTrainer`.

Run (CPU here; on a GPU add `--device cuda --bf16`, and a `--preset` for real shapes)::

    .venv/bin/pip install trl==1.16.0        # benchmark-only dependency
    .venv/bin/python benchmarks/sft_step.py  # writes benchmarks/RESULTS-sft.md
    .venv/bin/python benchmarks/sft_step.py --device cuda --bf16 --preset internvl3-2b --tokens-per-step 16384

What is compared. The random InternVL of `mpo_step.py` (same shapes, presets and model folder cache) trains on the
same single-image samples (one image cut into 6 tiles + thumbnail, a question, an answer of `--answer-tokens`
tokens) with the same optimizer (AdamW, lr 1e-5, weight decay 0.01, clipping 1.0, cosine schedule), attention kernel
(SDPA over padded rows; ours takes `--attn-implementation`, which changes nothing for rows without packing) and
gradient checkpointing. Each step takes `--tokens-per-step` tokens (image tokens included; rounded to whole
samples, or `--samples-per-step`), in one padded micro-batch:

- `ours`: `internvl_tune.recipes.sft.train`, the loss a global token mean.
- `trl`:  `trl.SFTTrainer`, fed our token ids, labels and pixels through a collator (as `mpo_step.py` feeds
  `DPOTrainer`): the same padded batch; its loss is also the mean over the step's labelled tokens.

The step-1 loss of both is in the table as a check that they trained on the same thing.

How it is measured. Each configuration runs in its own process (start-up excluded): `--warmup-steps` steps, then
`--timed-steps` timed steps (then, with `--profile`, two more: see `common.StepProfiler`). Supervised tokens/s =
labelled tokens (the positions the loss reads) of the timed steps / their wall time, data loading included (ours: the
recipe's per-step `step_time_s`; TRL: time between consecutive `on_step_end` callbacks). Model TFLOP/s = counted FLOPs
(rules in `common.py`) per sample x samples/s; both tools get the same count per sample. Peak memory:
`torch.cuda.max_memory_allocated` on a GPU, peak RSS (VmHWM) on a CPU.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402 (a sibling script module, not a package)
from common import QUESTION, SEED, Work, causal_pairs, mib  # noqa: E402

CONFIGS = ("ours", "trl")
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 0.01
LABELS = {"ours": "ours (recipes.sft)", "trl": "TRL SFTTrainer"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p, configs=CONFIGS, workdir="/tmp/internvl_tune_sft_bench", answer_tokens=256)
    p.add_argument("--tokens-per-step", type=int, default=16384, help="tokens per step, image tokens included")
    p.add_argument("--samples-per-step", type=int, help="samples per step (overrides --tokens-per-step)")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS-sft.md"), help="'' = do not write")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tokens_per_step < 1 or (args.samples_per_step is not None and args.samples_per_step < 1):
        p.error("--tokens-per-step and --samples-per-step must be >= 1")
    common.finish_common_args(p, args, CONFIGS)
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The workload: the model folder and single-image SFT records, built once by the parent process.


def sft_record(tokenizer, i: int, answer_tokens: int) -> dict[str, Any]:
    answer = common.answer_of_tokens(tokenizer, i, answer_tokens)
    return {
        "image": f"{i}.png",
        "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": answer}],
    }


def build_workload(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The model folder (cached per shape), the samples per step (from one probe sample's length unless given) and
    images + records + meta.json for every step."""
    model_dir = common.model_dir_for(args.shape, args.models, args.bf16)
    tokenizer = common.build_tokenizer()
    samples_per_step = args.samples_per_step
    if samples_per_step is None:
        probe = common.write_dataset(workdir / "probe", [sft_record(tokenizer, 0, args.answer_tokens)])
        sample_tokens = len(our_sample_dataset(args, model_dir, probe)[0]["input_ids"])
        samples_per_step = max(1, round(args.tokens_per_step / sample_tokens))
    records = [sft_record(tokenizer, i, args.answer_tokens) for i in range(samples_per_step * args.steps)]
    return {
        "model_dir": model_dir,
        "meta": common.write_dataset(workdir / "data", records),
        "samples_per_step": samples_per_step,
    }


def describe_samples(args: argparse.Namespace, model_dir: Path, meta: Path) -> dict[str, float]:
    """Mean tiles, tokens and labelled tokens per sample, and its counted FLOPs (forward + backward)."""
    from internvl_tune.constants import IGNORE_INDEX

    dataset = our_sample_dataset(args, model_dir, meta)
    samples = [dataset[i] for i in range(len(dataset))]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    scored = [int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples]
    works = [
        Work(len(s["pixel_values"]), len(s["input_ids"]), causal_pairs(len(s["input_ids"])), n)
        for s, n in zip(samples, scored, strict=True)
    ]
    return {
        "tiles": mean([len(s["pixel_values"]) for s in samples]),
        "image_tokens": mean([s["num_image_tokens"] for s in samples]),
        "tokens": mean([len(s["input_ids"]) for s in samples]),
        "labelled_tokens": mean(scored),
        "flops_per_sample": mean([common.step_flops(args.shape, w) for w in works]),
    }


def our_sample_dataset(args: argparse.Namespace, model_dir: Path, meta: Path):
    """Samples exactly as our recipe builds them (same template, tiling and tokens)."""
    from transformers import AutoConfig, AutoTokenizer

    from internvl_tune.config import DataArgs
    from internvl_tune.data.dataset import RecordDataset
    from internvl_tune.data.transform import SampleBuilder
    from internvl_tune.model.prepare import sample_settings

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    data = DataArgs(meta_path=str(meta), max_dynamic_patch=args.max_dynamic_patch, max_seq_length=32768)
    settings = sample_settings(data, AutoConfig.from_pretrained(model_dir, local_files_only=True))
    return RecordDataset(meta, SampleBuilder(tokenizer, settings), seed=SEED, require_data_augment=False)


# ----------------------------------------------------------------------------------------------------------------------
# The configurations, each run in a child process.


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    from internvl_tune.config import SFTConfig, load_config
    from internvl_tune.recipes.sft import train
    from internvl_tune.training.metrics import read_metrics

    workdir = Path(args.workdir)
    overrides = [
        f"model.model_name_or_path={common.model_dir_for(args.shape, args.models, args.bf16)}",
        f"model.grad_checkpoint={str(args.grad_checkpoint).lower()}",
        f"model.attn_implementation={args.attn_implementation}",
        "model.drop_path_rate=0.0",  # TRL's model has no DropPath; the same math on both sides
        f"data.meta_path={workdir / 'data' / 'meta.json'}",
        f"data.max_dynamic_patch={args.max_dynamic_patch}",
        "data.max_seq_length=32768",
        f"train.output_dir={workdir / 'runs' / 'ours'}",
        f"train.max_steps={args.steps}",
        f"train.per_device_train_batch_size={args.samples_per_step}",
        f"train.learning_rate={LEARNING_RATE}",
        f"train.weight_decay={WEIGHT_DECAY}",
        "train.warmup_ratio=0.0",
        "train.shuffle=false",  # the same sample order as TRL's sequential sampler
        f"train.bf16={str(args.bf16).lower()}",
        f"train.seed={SEED}",
        "train.logging_steps=1",
    ]
    config = load_config(SFTConfig, None, overrides)
    shutil.rmtree(config.train.output_dir, ignore_errors=True)  # metrics.jsonl is appended to, never replaced
    train(config)
    rows = read_metrics(Path(config.train.output_dir) / "metrics.jsonl")
    shutil.rmtree(config.train.output_dir, ignore_errors=True)  # the final model: disk, not a result
    timed = rows[args.warmup_steps : args.warmup_steps + args.timed_steps]
    seconds = sum(r["step_time_s"] for r in timed)
    return {
        "step_times_s": [r["step_time_s"] for r in rows],
        "samples_per_s": sum(r["num_samples"] for r in timed) / seconds,
        "supervised_tokens_per_s": sum(r["num_loss_tokens"] for r in timed) / seconds,
        "first_loss": rows[0]["loss"],
    }


def trl_collate(rows: list[dict[str, Any]], samples, pad_token_id: int, counts: list[int]) -> dict[str, Any]:
    """The batch our `pad_collate` makes, in TRL's names: right-padded `input_ids`, `attention_mask`, `labels`
    (IGNORE_INDEX on padding and non-answer tokens) and the tiles of all samples. Appends the batch's labelled
    (scored) token count to `counts`.

    Example, samples [5, 6, 7] (labels [-100, 6, 7]) and [5, 8], pad 9::

        input_ids      [[5, 6, 7], [5, 8, 9]]
        attention_mask [[1, 1, 1], [1, 1, 0]]
        labels         [[-100, 6, 7], [-100, 8, -100]]
    """
    import torch

    from internvl_tune.constants import IGNORE_INDEX

    batch = [samples[row["index"]] for row in rows]
    length = max(len(s["input_ids"]) for s in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for i, s in enumerate(batch):
        input_ids[i, : len(s["input_ids"])] = s["input_ids"]
        attention_mask[i, : len(s["input_ids"])] = 1
        labels[i, : len(s["labels"])] = s["labels"]
    counts.append(int((labels[:, 1:] != IGNORE_INDEX).sum()))
    pixel_values = torch.cat([s["pixel_values"] for s in batch])  # [N, 3, S, S]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from internvl_tune.model.load import load_model

    workdir = Path(args.workdir)
    model_dir = common.model_dir_for(args.shape, args.models, args.bf16)
    model, tokenizer = load_model(model_dir)
    samples = our_sample_dataset(args, model_dir, workdir / "data" / "meta.json")
    # The "image" column tells TRL the data is multimodal (and skips its preparation); our collator reads the sample.
    dataset = Dataset.from_list([{"image": str(i), "index": i} for i in range(len(samples))])
    clock = common.step_clock()
    counts: list[int] = []
    config = SFTConfig(
        **common.trl_run_settings(
            args,
            output_dir=str(workdir / "runs" / "trl"),
            batch_size=args.samples_per_step,
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            seed=SEED,
        )
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=common.tokenizer_only_processor(tokenizer),
        data_collator=lambda rows: trl_collate(rows, samples, tokenizer.pad_token_id, counts),
        callbacks=[clock],
    )
    trainer.train()
    step_times, timed_s = common.trl_step_times(clock.step_ends, args.warmup_steps, args.timed_steps)
    # Batches are collated in step order (the loader may run one ahead), so batch k is step k's.
    timed_tokens = sum(counts[args.warmup_steps : args.warmup_steps + args.timed_steps])
    return {
        "step_times_s": step_times,
        "samples_per_s": args.samples_per_step * args.timed_steps / timed_s,
        "supervised_tokens_per_s": timed_tokens / timed_s,
        "first_loss": clock.logs[0]["loss"],
    }


# ----------------------------------------------------------------------------------------------------------------------
# The parent: build the workload, run each configuration in a fresh process, report.


def report(args: argparse.Namespace, argv: list[str], results: dict[str, dict], workload: dict[str, Any]) -> str:
    s = workload["samples"]
    on_cpu = args.device == "cpu"
    lines = common.header_lines("SFT step benchmark", "sft_step.py", argv, args, workload["num_params"])
    lines += [
        f"- Data per sample: {s['tiles']:.0f} tiles ({s['image_tokens']:.0f} image tokens), {s['tokens']:.0f} tokens "
        f"(image tokens included), {s['labelled_tokens']:.0f} labelled (answer tokens incl. `<|im_end|>\\n`); "
        f"{s['flops_per_sample'] / 1e12:.3f} TFLOP per sample (forward + backward)",
        f"- Run: {args.samples_per_step} samples per step ({args.samples_per_step * s['tokens']:,.0f} tokens), one "
        f"micro-batch, {args.warmup_steps} warm-up + {args.timed_steps} timed steps per configuration, {args.device}, "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, gradient checkpointing {'on' if args.grad_checkpoint else 'off'}"
        f", our attention `{args.attn_implementation}` (TRL: sdpa), AdamW lr {LEARNING_RATE}, weight decay "
        f"{WEIGHT_DECAY}, no DropPath",
        "",
    ]
    memory = "peak RSS" if on_cpu else "max_memory_allocated"
    header = f"| configuration | supervised tokens/s | x TRL | samples/s | s/step | TFLOP/s | of peak | {memory} | step-1 loss |"
    lines += [header, "|---|" + "---:|" * (header.count("|") - 2)]
    trl = results.get("trl", {})
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {LABELS[name]} | failed: {r['error']} |")
            continue
        rate = r["supervised_tokens_per_s"]
        cells = [LABELS[name], f"{rate:,.1f}"]
        cells.append(f"{rate / trl['supervised_tokens_per_s']:.2f}" if "supervised_tokens_per_s" in trl else "-")
        cells += [f"{r['samples_per_s']:.3f}", f"{args.samples_per_step / r['samples_per_s']:.2f}"]
        cells += common.tflops_cells(s["flops_per_sample"] * r["samples_per_s"], args.device)
        cells += [mib(r["peak_memory_bytes"]), f"{r['first_loss']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    others = ", ".join(f"{n} {r['other_cpu_cores']:.2f}" for n, r in results.items() if "other_cpu_cores" in r)
    lines += [
        "",
        f"CPU cores other processes kept busy on average during each timed run (they slow it): {others}.",
        "",
        "## Notes",
        "",
        "- Same computation: TRL gets the token ids, labels and pixels of our `SampleBuilder` in the padded batch of "
        "our collator, through a tokenizer-only `ProcessorMixin` (the stock `InternVLProcessor` needs torchvision); "
        "equal step-1 losses show that both computed the same loss on the same tokens.",
        f"- {common.FLOP_NOTE} {common.peak_note(args.device)}",
    ]
    lines += common.profile_section(results, LABELS)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        run = run_ours if args.child == "ours" else run_trl
        common.child_main(args, lambda: run(args), profile=args.profile)
        return
    start = time.perf_counter()
    workdir = Path(args.workdir)
    paths = build_workload(args, workdir)
    args.samples_per_step = paths["samples_per_step"]
    workload = {
        "num_params": common.num_parameters(paths["model_dir"]),
        "samples": describe_samples(args, paths["model_dir"], paths["meta"]),
    }
    print(f"workload: {workload}", flush=True)
    child_argv = [*argv, "--samples-per-step", str(args.samples_per_step)]
    results: dict[str, dict] = {}
    for name in args.names:
        print(f"== {name}", flush=True)
        results[name] = common.spawn(__file__, name, child_argv, args)
        print(f"== {name}: { {k: v for k, v in results[name].items() if k != 'profile'} }", flush=True)
    text = report(args, argv, results, workload)
    text += f"\nWhole benchmark: {time.perf_counter() - start:.0f} s wall time.\n"
    print(text)
    common.write_report(args.results, text)


if __name__ == "__main__":
    main()
