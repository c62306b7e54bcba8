"""One MPO training step, side by side: our shared-prefix pairs, our separate layout, and TRL's `DPOTrainer`.

Run (CPU here; on a GPU add `--device cuda --bf16`, and `--preset internvl2_5-1b` for real shapes)::

    .venv/bin/pip install trl==1.16.0        # benchmark-only dependency
    .venv/bin/python benchmarks/mpo_step.py  # writes benchmarks/RESULTS.md
    .venv/bin/python benchmarks/mpo_step.py --device cuda --bf16 --preset internvl3-2b --pairs-per-step 4 --profile

What is compared. One random InternVL (InternViT + Qwen2 LLM; a `--preset` gives the real InternVL 2.5 / 3 shapes,
flags override single fields; the default is a small model with the real 151,674-token vocabulary) is saved once
per shape; every configuration trains it on the same preference pairs (one image cut into 6 tiles + thumbnail,
answers of `--answer-tokens` tokens) with the same loss mix (sigmoid / bco_pair / sft, weights 0.8 / 0.2 / 1.0,
beta 0.1), optimizer (AdamW, lr 1e-6, clipping 1.0) and gradient checkpointing. Our runs use
`--attn-implementation` (default auto: flex attention on CUDA, one SDPA call per prompt + chosen answer and per
rejected answer on CPU); TRL runs SDPA over its two padded rows:

- `shared`:      our recipe, one `[prompt | chosen | rejected]` row per pair, frozen reference copy.
- `separate`:    our recipe, chosen and rejected as two rows (the original InternVL layout), frozen reference copy.
- `trl`:         `trl.DPOTrainer` with `loss_type=["sigmoid", "bco_pair", "sft"]`, `loss_weights=[0.8, 0.2, 1.0]`.
- `precomputed`: `shared` with reference log-probs precomputed once (not timed), so training holds one model.

Both tools see the same tokens: TRL gets the ids and pixels our `PairBuilder` makes (its own vision collator needs
the stock `InternVLProcessor`, which needs torchvision), through a collator that lays them out as TRL's vision
collator does: rows `prompt + chosen` then `prompt + rejected`, every image's tiles once per row. The first step's
loss and chosen log-prob are printed per tool as a check (policy == reference there, and delta starts at 0, so
TRL's delta-free bco_pair equals ours).

How it is measured. Each configuration runs in its own process (start-up excluded from throughput, peak memory not
shared): `--warmup-steps` steps, then `--timed-steps` timed steps (then, with `--profile`, two more: see
`common.StepProfiler`). pairs/s = pairs of the timed steps / their wall time, data loading included (ours: the
recipe's per-step `step_time_s`; TRL: time between consecutive `on_step_end` callbacks). Model TFLOP/s = counted
FLOPs per pair (rules in `common.py`: each configuration counts the work its layout needs, so the shared layout
does fewer FLOPs per pair than the two-row layouts) x pairs/s. Peak memory on GPU: `torch.cuda.max_memory_allocated`
of the same run. On CPU the process's peak resident set (VmHWM) is reported twice: from the timed run (default
malloc: what a user's process shows, but noisy), and from a second 3-step run with a fixed malloc threshold
(`FIXED_MALLOC`), where it is the peak of memory actually held; the memory target is checked on the latter. The
reference copy's size is its parameter bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402 (a sibling script module, not a package)
from common import FIXED_MALLOC, QUESTION, SEED, Work, causal_pairs, mib  # noqa: E402

CONFIGS = ("shared", "separate", "trl", "precomputed")
LOSS_TYPES = ["sigmoid", "bco_pair", "sft"]
LOSS_WEIGHTS = [0.8, 0.2, 1.0]
BETA = 0.1
LEARNING_RATE = 1e-6
LABELS = {
    "shared": "ours, shared prefix, reference copy",
    "separate": "ours, separate rows, reference copy",
    "trl": "TRL DPOTrainer",
    "precomputed": "ours, shared prefix, precomputed reference",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p, configs=CONFIGS, workdir="/tmp/internvl_tune_mpo_bench", answer_tokens=150)
    p.add_argument("--pairs-per-step", "--batch-size", dest="pairs_per_step", type=int, default=1)
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS.md"), help="'' = do not write")
    p.add_argument(
        "--no-memory-runs",
        dest="memory_runs",
        action="store_false",
        help="CPU: skip the second, memory-only run per configuration (fixed malloc threshold)",
    )
    p.add_argument("--child", choices=(*CONFIGS, "precompute"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pairs_per_step < 1:
        p.error("--pairs-per-step must be >= 1")
    common.finish_common_args(p, args, CONFIGS)
    args.num_pairs = args.pairs_per_step * args.steps  # one epoch: every step sees new pairs
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The workload: a model folder and an MMPR-style dataset, built once by the parent process.


def build_workload(args: argparse.Namespace, workdir: Path) -> dict[str, Path]:
    """The model folder (cached per shape) and images + pairs + meta.json."""
    model_dir = common.model_dir_for(args.shape, args.models, args.bf16)
    tokenizer = common.build_tokenizer()
    records = [
        {
            "image": f"{i}.png",
            "question": QUESTION,
            "chosen": common.answer_of_tokens(tokenizer, 2 * i, args.answer_tokens),
            "rejected": common.answer_of_tokens(tokenizer, 2 * i + 1, args.answer_tokens),
        }
        for i in range(args.num_pairs)
    ]
    return {"model_dir": model_dir, "meta": common.write_dataset(workdir / "data", records)}


def describe_pairs(args: argparse.Namespace, model_dir: Path, meta: Path) -> dict[str, Any]:
    """Token and tile counts of the pairs as both tools see them (mean over pairs), and the counted FLOPs per pair
    of each configuration."""
    from internvl_tune.constants import IGNORE_INDEX

    pairs = our_pair_dataset(args, model_dir, meta)
    samples = [pairs[i] for i in range(len(pairs))]  # (indices past the end are later epochs)
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    flops: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for s in samples:
        tiles, p, c, r = len(s["pixel_values"]), len(s["prompt_ids"]), len(s["chosen_ids"]), len(s["rejected_ids"])
        scored = int((s["chosen_labels"] != IGNORE_INDEX).sum() + (s["rejected_labels"] != IGNORE_INDEX).sum())
        # separate: two causal rows, the tiles twice.
        shared = Work(tiles, p + c + r, common.shared_row_pairs(p, c, r), scored)
        separate = Work(2 * tiles, 2 * p + c + r, causal_pairs(p + c) + causal_pairs(p + r), scored)
        flops["shared"].append(common.step_flops(args.shape, shared, reference=shared))
        flops["separate"].append(common.step_flops(args.shape, separate, reference=separate))
        flops["trl"].append(flops["separate"][-1])
        flops["precomputed"].append(common.step_flops(args.shape, shared))
    return {
        "tiles": mean([len(s["pixel_values"]) for s in samples]),
        "image_tokens": mean([s["num_image_tokens"] for s in samples]),
        "prompt_tokens": mean([len(s["prompt_ids"]) for s in samples]),
        "chosen_tokens": mean([len(s["chosen_ids"]) for s in samples]),
        "rejected_tokens": mean([len(s["rejected_ids"]) for s in samples]),
        "flops_per_pair": {name: mean(values) for name, values in flops.items()},
    }


# ----------------------------------------------------------------------------------------------------------------------
# The configurations, each run in a child process.


def our_config(args: argparse.Namespace, name: str):
    from internvl_tune.config import MPOConfig, load_config

    workdir = Path(args.workdir)
    layout = "separate" if name == "separate" else "shared"
    reference = "precomputed" if name in ("precomputed", "precompute") else "copy"
    overrides = [
        f"model.model_name_or_path={common.model_dir_for(args.shape, args.models, args.bf16)}",
        f"model.grad_checkpoint={str(args.grad_checkpoint).lower()}",
        f"model.attn_implementation={args.attn_implementation}",
        "model.drop_path_rate=0.0",  # TRL's model has no DropPath; the same math on both sides
        f"data.meta_path={workdir / 'data' / 'meta.json'}",
        f"data.max_dynamic_patch={args.max_dynamic_patch}",
        "data.max_seq_length=32768",
        f"train.output_dir={workdir / 'runs' / name}",
        f"train.max_steps={args.steps}",
        f"train.per_device_train_batch_size={args.pairs_per_step}",
        f"train.learning_rate={LEARNING_RATE}",
        "train.warmup_ratio=0.0",
        "train.shuffle=false",  # the same pair order as TRL's sequential sampler
        f"train.bf16={str(args.bf16).lower()}",
        f"train.seed={SEED}",
        "train.logging_steps=1",
        f"mpo.loss_type={json.dumps(LOSS_TYPES)}",
        f"mpo.loss_weights={json.dumps(LOSS_WEIGHTS)}",
        f"mpo.beta={BETA}",
        f"mpo.reference={reference}",
        f"mpo.reference_cache={workdir / 'reference_logps.pt'}",
        f"mpo.pair_layout={layout}",
    ]
    return load_config(MPOConfig, None, overrides)


def run_ours(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from internvl_tune.recipes.mpo import train
    from internvl_tune.training.metrics import read_metrics

    config = our_config(args, name)
    shutil.rmtree(config.train.output_dir, ignore_errors=True)  # metrics.jsonl is appended to, never replaced
    train(config)
    rows = read_metrics(Path(config.train.output_dir) / "metrics.jsonl")
    shutil.rmtree(config.train.output_dir, ignore_errors=True)  # the final model: disk, not a result
    timed = rows[args.warmup_steps : args.warmup_steps + args.timed_steps]
    return {
        "step_times_s": [r["step_time_s"] for r in rows],
        "pairs_per_s": sum(r["num_samples"] for r in timed) / sum(r["step_time_s"] for r in timed),
        "first_loss": rows[0]["loss"],
        "first_logps_chosen": rows[0]["logps/chosen"],
    }


def our_pair_dataset(args: argparse.Namespace, model_dir: Path, meta: Path):
    """Pairs exactly as our recipe builds them (same template, tiling and tokens)."""
    from transformers import AutoConfig, AutoTokenizer

    from internvl_tune.config import DataArgs
    from internvl_tune.data.dataset import RecordDataset
    from internvl_tune.data.preference import PairBuilder
    from internvl_tune.data.transform import SampleBuilder
    from internvl_tune.model.prepare import sample_settings

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    data = DataArgs(meta_path=str(meta), max_dynamic_patch=args.max_dynamic_patch, max_seq_length=32768)
    settings = sample_settings(data, AutoConfig.from_pretrained(model_dir, local_files_only=True))
    builder = PairBuilder(SampleBuilder(tokenizer, settings))
    return RecordDataset(meta, builder, seed=SEED, require_data_augment=False)


def trl_collate(rows: list[dict[str, Any]], pairs, pad_token_id: int) -> dict[str, Any]:
    """TRL's vision-preference batch from our pairs: rows `prompt + chosen` for every pair, then `prompt + rejected`,
    right-padded; `completion_mask` marks the trained answer tokens; the tiles are in the batch once per row.

    Example, one pair with P=2, chosen [c0, c1], rejected [r0], pad 9::

        input_ids       [[p0, p1, c0, c1], [p0, p1, r0, 9]]
        attention_mask  [[1, 1, 1, 1], [1, 1, 1, 0]]
        completion_mask [[0, 0, 1, 1], [0, 0, 1, 0]]
    """
    import torch

    from internvl_tune.constants import IGNORE_INDEX

    samples = [pairs[row["index"]] for row in rows]
    sequences = [
        (torch.cat([s["prompt_ids"], s[f"{side}_ids"]]), s[f"{side}_labels"], len(s["prompt_ids"]))
        for side in ("chosen", "rejected")
        for s in samples
    ]
    length = max(len(ids) for ids, _, _ in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, (ids, labels, prompt_length) in enumerate(sequences):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, prompt_length : len(ids)] = (labels != IGNORE_INDEX).long()
    pixel_values = torch.cat([s["pixel_values"] for s in samples]).repeat(2, 1, 1, 1)  # [2N, 3, S, S]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "pixel_values": pixel_values,
    }


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from internvl_tune.model.load import load_model

    workdir = Path(args.workdir)
    model_dir = common.model_dir_for(args.shape, args.models, args.bf16)
    model, tokenizer = load_model(model_dir)
    pairs = our_pair_dataset(args, model_dir, workdir / "data" / "meta.json")
    # The "image" column tells TRL the data is multimodal; our collator reads the pair by index.
    dataset = Dataset.from_list([{"image": str(i), "index": i} for i in range(len(pairs))])
    clock = common.step_clock()
    config = DPOConfig(
        loss_type=LOSS_TYPES,
        loss_weights=LOSS_WEIGHTS,
        beta=BETA,
        **common.trl_run_settings(
            args,
            output_dir=str(workdir / "runs" / "trl"),
            batch_size=args.pairs_per_step,
            learning_rate=LEARNING_RATE,
            weight_decay=0.05,
            seed=SEED,
        ),
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=common.tokenizer_only_processor(tokenizer),
        data_collator=lambda rows: trl_collate(rows, pairs, tokenizer.pad_token_id),
        callbacks=[clock],
    )
    trainer.train()
    step_times, timed_s = common.trl_step_times(clock.step_ends, args.warmup_steps, args.timed_steps)
    return {
        "step_times_s": step_times,
        "pairs_per_s": args.pairs_per_step * args.timed_steps / timed_s,
        "first_loss": clock.logs[0]["loss"],
        "first_logps_chosen": clock.logs[0].get("logps/chosen"),
    }


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    if args.child == "precompute":
        from internvl_tune.recipes.precompute_ref import precompute_reference

        precompute_reference(our_config(args, "precompute"))
        return {}
    if args.child == "trl":
        return run_trl(args)
    return run_ours(args, args.child)


# ----------------------------------------------------------------------------------------------------------------------
# The parent: build the workload, run each configuration in a fresh process, report.


def run_all(args: argparse.Namespace, argv: list[str]) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for name in args.names:
        if name == "precomputed":
            done = common.spawn(__file__, "precompute", argv, args)  # once, not timed
            if "error" in done:
                results[name] = {"error": f"precompute-ref failed: {done['error']}"}
                continue
        print(f"== {name}", flush=True)
        results[name] = common.spawn(__file__, name, argv, args)
        if args.device == "cpu" and args.memory_runs and "error" not in results[name]:
            # A second, shorter run for memory only: 3 steps reach the steady state (Adam states exist from step 1).
            short = [*argv, "--warmup-steps", "1", "--timed-steps", "2", "--no-profile"]
            memory = common.spawn(__file__, name, short, args, env_extra=FIXED_MALLOC)
            results[name]["held_peak_bytes"] = memory.get("peak_memory_bytes")
        print(f"== {name}: { {k: v for k, v in results[name].items() if k != 'profile'} }", flush=True)
    return results


def report(args: argparse.Namespace, argv: list[str], results: dict[str, dict], workload: dict[str, Any]) -> str:
    """The markdown report: set-up, the table, and each target with its numbers."""
    num_params = workload["num_params"]
    ref_bytes = num_params * (2 if args.bf16 else 4)  # one reference copy as our recipe holds it
    pairs = workload["pairs"]
    flops = pairs["flops_per_pair"]
    on_cpu = args.device == "cpu"
    # The memory the targets use: held memory (fixed malloc threshold) on CPU, max_memory_allocated on GPU.
    held = {n: r.get("held_peak_bytes") if on_cpu else r.get("peak_memory_bytes") for n, r in results.items()}
    trl = results.get("trl", {})
    lines = common.header_lines("MPO step benchmark", "mpo_step.py", argv, args, num_params)
    lines += [
        f"- Reference copy: {mib(ref_bytes)} ({ref_bytes:,} bytes, {'bf16' if args.bf16 else 'fp32'})",
        f"- Data per pair: {pairs['tiles']:.0f} tiles ({pairs['image_tokens']:.0f} image tokens), prompt "
        f"{pairs['prompt_tokens']:.0f} tokens (image tokens included), chosen {pairs['chosen_tokens']:.0f} and "
        f"rejected {pairs['rejected_tokens']:.0f} tokens (answer tokens incl. `<|im_end|>\\n`)",
        f"- Run: {args.pairs_per_step} pair(s) per step, {args.warmup_steps} warm-up + {args.timed_steps} timed steps "
        f"per configuration, {args.device}, {'bf16 autocast' if args.bf16 else 'fp32'}, gradient checkpointing "
        f"{'on' if args.grad_checkpoint else 'off'}, our attention `{args.attn_implementation}` (TRL: sdpa), AdamW lr "
        f"{LEARNING_RATE}, no DropPath",
        f"- Loss (both tools): `loss_type={LOSS_TYPES}`, `loss_weights={LOSS_WEIGHTS}`, beta {BETA}",
        "",
    ]
    if on_cpu:
        header = "| configuration | pairs/s | x TRL | s/step | TFLOP/s | peak held memory | x TRL | peak RSS, default malloc |"
    else:
        header = "| configuration | pairs/s | x TRL | s/step | TFLOP/s | of peak | max_memory_allocated | x TRL |"
    lines += [
        header + " step-1 loss | step-1 logp(chosen) |",
        "|---|" + "---:|" * header.count("|"),
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {LABELS[name]} | failed: {r['error']} |")
            continue
        cells = [LABELS[name], f"{r['pairs_per_s']:.4f}"]
        cells.append(f"{r['pairs_per_s'] / trl['pairs_per_s']:.2f}" if "pairs_per_s" in trl else "-")
        cells.append(f"{args.pairs_per_step / r['pairs_per_s']:.2f}")
        tflops = common.tflops_cells(flops[name] * r["pairs_per_s"], args.device)
        cells += tflops[:1] if on_cpu else tflops
        cells.append(mib(held[name]) if held[name] else "-")
        cells.append(f"{held[name] / held['trl']:.2f}" if held[name] and held.get("trl") else "-")
        if on_cpu:
            cells.append(mib(r["peak_memory_bytes"]))
        cells.append(f"{r['first_loss']:.4f}")
        cells.append(f"{r['first_logps_chosen']:.2f}" if r.get("first_logps_chosen") is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")

    others = ", ".join(f"{n} {r['other_cpu_cores']:.2f}" for n, r in results.items() if "other_cpu_cores" in r)
    lines += [
        "",
        f"CPU cores other processes kept busy on average during each timed run (they slow it): {others}.",
    ]
    tiles = pairs["tiles"]
    one_row = pairs["prompt_tokens"] + pairs["chosen_tokens"] + pairs["rejected_tokens"]
    two_rows = one_row + pairs["prompt_tokens"]
    lines += [
        "",
        "Work per pair and step (policy forward + backward, then reference forward), and its counted FLOPs:",
        f"- shared: ViT {tiles:.0f} + {tiles:.0f} tiles, LLM {one_row:.0f} + {one_row:.0f} tokens; "
        f"{flops['shared'] / 1e12:.3f} TFLOP",
        f"- separate and TRL: ViT {2 * tiles:.0f} + {2 * tiles:.0f} tiles, LLM {two_rows:.0f} + {two_rows:.0f} "
        f"tokens (prompt and image twice per pair, in policy and reference); {flops['separate'] / 1e12:.3f} TFLOP",
        f"- precomputed: ViT {tiles:.0f} tiles, LLM {one_row:.0f} tokens (no reference pass); "
        f"{flops['precomputed'] / 1e12:.3f} TFLOP",
    ]
    lines += ["", "## Targets", ""]
    shared = results.get("shared", {})
    if "pairs_per_s" in shared and "pairs_per_s" in trl:
        ratio = shared["pairs_per_s"] / trl["pairs_per_s"]
        lines.append(
            f"- Shared-prefix pairs/s >= 1.7 x TRL: **{'met' if ratio >= 1.7 else 'not met'}**, "
            f"{shared['pairs_per_s']:.4f} / {trl['pairs_per_s']:.4f} = {ratio:.2f} x."
        )
    else:
        lines.append("- Shared-prefix pairs/s >= 1.7 x TRL: not measured (a run failed or was not selected).")
    if held.get("shared") and held.get("precomputed"):
        saved = held["shared"] - held["precomputed"]
        lines.append(
            f"- Precomputed reference: peak below the live-reference run by >= 90% of the reference weights: "
            f"**{'met' if saved >= 0.9 * ref_bytes else 'not met'}**, {mib(held['shared'])} - "
            f"{mib(held['precomputed'])} = {mib(saved)} = {saved / ref_bytes:.1%} of the {mib(ref_bytes)} copy."
        )
    else:
        lines.append("- Precomputed-reference memory: not measured (a run failed or was not selected).")

    lines += [
        "",
        "## Notes",
        "",
        "- Same computation: TRL gets the token ids and pixels of our `PairBuilder` through a collator with the "
        "layout of its own vision collator (rows `prompt + chosen`, then `prompt + rejected`, the tiles once per "
        "row) and a tokenizer-only `ProcessorMixin` (the stock `InternVLProcessor` needs torchvision). Its reference "
        "is the copy `DPOTrainer` loads itself from the model folder. Equal step-1 loss and chosen log-prob in every "
        "row show that both tools computed the same objective on the same tokens.",
        f"- Speed: the shared-prefix pair does half the ViT tiles and {one_row / two_rows:.0%} of the LLM tokens "
        "of the two-row layout, in the policy and in the reference pass, so its speed-up over TRL stays under 2x; "
        "`separate` does the same work as TRL.",
        f"- {common.FLOP_NOTE} Each configuration is credited with the FLOPs of its own layout, so TFLOP/s compares "
        f"how well each uses the device, pairs/s how fast each trains. {common.peak_note(args.device)}",
    ]
    if on_cpu:
        fixed = ", ".join(f"{k}={v}" for k, v in FIXED_MALLOC.items())
        lines += [
            "- Memory on CPU: *peak held memory* is the peak RSS (VmHWM) of a second, 3-step run of each "
            f"configuration with glibc's malloc thresholds fixed ({fixed}), so that freed blocks go back to the "
            "system and RSS follows the memory the process holds; identical runs agree within 1 MiB. *Peak RSS, "
            "default malloc* is the VmHWM of the timed run: what a user's process shows, but glibc's caching moves "
            "it by about 100 MiB between identical runs here (more than the reference copy), so the memory target "
            "is checked on the held column. TRL's process also imports trl, datasets, pyarrow and pandas, which "
            "count in its RSS.",
        ]
    lines.append("- The precomputed reference pass (one reference forward per pair, once) is not timed.")
    lines += common.profile_section(results, LABELS)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        common.child_main(args, lambda: run_child(args), profile=args.profile and args.child in CONFIGS)
        return
    start = time.perf_counter()
    paths = build_workload(args, Path(args.workdir))
    workload = {
        "num_params": common.num_parameters(paths["model_dir"]),
        "pairs": describe_pairs(args, paths["model_dir"], paths["meta"]),
    }
    print(f"workload: {workload}", flush=True)
    results = run_all(args, argv)
    text = report(args, argv, results, workload)
    text += f"\nWhole benchmark: {time.perf_counter() - start:.0f} s wall time.\n"
    print(text)
    common.write_report(args.results, text)


if __name__ == "__main__":
    main()
