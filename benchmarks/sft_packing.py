"""SFT supervised tokens/s with packing vs padded batches vs length-grouped batches, on a realistic data mix.

Run (CPU here; on a GPU add `--device cuda --bf16 --preset internvl2_5-1b`)::

    .venv/bin/python benchmarks/sft_packing.py   # writes benchmarks/RESULTS-packing.md

The mix (`--num-samples`, seeded): answer lengths from a log-normal distribution (median `--median-answer-tokens`,
sigma 1.0, capped at 2,000 tokens), 20% text-only samples, 10% with two or three images, the rest one image of 1 to
13 tiles (image sizes that tile into 1x1, 2x1, 2x2, 3x2, 4x2, 3x3, 4x3 grids, plus the thumbnail). The same random
InternVL as `mpo_step.py` (presets and the 151,674-row vocabulary included) trains one epoch of it with our SFT recipe
in three configurations, each in its own process:

- `padded`: random batches of `--batch-size` samples, padded to the longest;
- `grouped`: the same batch size, samples of similar length batched together (`data.group_by_length`);
- `packed`: rows of up to `--max-packed-tokens` tokens and 48 tiles (`data.packing`), one row per micro-batch.

Supervised tokens/s = the epoch's labelled tokens / the sum of its steps' `step_time_s` (the recipe's own step time,
data loading included; model loading, length measuring and saving are not in it). Padding waste = padded positions /
all positions of the epoch. Peak memory: VmHWM on CPU, `torch.cuda.max_memory_allocated` on a GPU. Every configuration
trains on the same samples: the sum of labelled tokens over the epoch is the same (checked in the report).

Counted work (the rules of `common.py`, from each run's metrics): the ViT and projector on the epoch's tiles (the
ViT's attention included; forward + backward when trained, forward only with `--freeze-backbone`), the LLM's weights
on every position it computes (padding included, since a padded batch runs it), the LM head on the labelled
positions; the LLM's attention is left out, as it depends on the kernel (dense masks over padded rows, one causal call
per packed sample). Packing can only shrink the LLM's share; the ratio of the totals is what removing padding alone
gives.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402 (a sibling script module, not a package)

CONFIGS = ("padded", "grouped", "packed")
LEARNING_RATE = 1e-5
# (columns, rows) of tile grids: 1 tile (no thumbnail), then c x r + 1 thumbnail = 3, 5, 7, 9, 10, 13 tiles.
GRIDS = [(1, 1), (2, 1), (2, 2), (3, 2), (4, 2), (3, 3), (4, 3)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(common.PRESETS), help="real InternVL shapes (default: the small dims)")
    for name in common._SHAPE_FLAGS:
        p.add_argument(
            f"--{name.replace('_', '-')}", type=int, help=f"without --preset: {getattr(common.DEFAULT_SHAPE, name)}"
        )
    p.add_argument("--max-dynamic-patch", type=int, default=12, help="most tiles per image (1-13 with 12)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--median-answer-tokens", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=4, help="samples per padded micro-batch")
    p.add_argument("--max-packed-tokens", type=int, default=8192)
    p.add_argument("--max-seq-length", type=int, default=8192)
    p.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="freeze the ViT, as the official InternVL 2.5 / 3 fine-tuning scripts and configs/sft/ do",
    )
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--workdir", default="/tmp/internvl_tune_packing_bench")
    p.add_argument("--results", default=str(Path(__file__).parent / "RESULTS-packing.md"), help="'' = do not write")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if set(args.names) - set(CONFIGS):
        p.error(f"--configs: known configurations are {CONFIGS}")
    base = common.PRESETS[args.preset] if args.preset else common.DEFAULT_SHAPE
    args.shape = dataclasses.replace(
        base, **{n: getattr(args, n) for n in common._SHAPE_FLAGS if getattr(args, n) is not None}
    )
    args.models = str(Path(args.workdir) / "models")
    # What common.spawn / child_main read.
    args.steps, args.profile = 0, False
    return args


def write_image(path: Path, grid: tuple[int, int], i: int) -> None:
    from PIL import Image, ImageDraw

    size = (448 * grid[0], 448 * grid[1])
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for k in range(6):
        x, y = (i * 97 + k * 211) % size[0], (i * 53 + k * 149) % size[1]
        draw.ellipse((x, y, x + 200, y + 160), fill=((k * 70) % 256, (i * 40) % 256, 200 - k * 30))
    image.save(path)


def build_workload(args: argparse.Namespace) -> dict[str, Any]:
    """The model folder and a seeded mix of text-only, single- and multi-image samples of long-tailed lengths."""
    workdir = Path(args.workdir)
    model_dir = common.model_dir_for(args.shape, args.models, args.bf16)
    tokenizer = common.build_tokenizer()
    rng = random.Random(0)
    data = workdir / "data"
    shutil.rmtree(data, ignore_errors=True)
    (data / "images").mkdir(parents=True)
    records = []
    for i in range(args.num_samples):
        answer_tokens = min(2000, max(4, round(rng.lognormvariate(math.log(args.median_answer_tokens), 1.0))))
        kind = rng.random()
        num_images = 0 if kind < 0.2 else (rng.choice([2, 3]) if kind < 0.3 else 1)
        images = []
        for k in range(num_images):
            name = f"{i}_{k}.png"
            write_image(data / "images" / name, rng.choice(GRIDS), i * 3 + k)
            images.append(name)
        # One image: the builder puts "<image>\n" in front; several: one numbered placeholder line each.
        question = "".join(f"Image-{k + 1}: <image>\n" for k in range(num_images)) if num_images > 1 else ""
        question += "Describe the image in detail." if num_images else "Describe a picture of shapes in detail."
        record = {
            "conversations": [
                {"from": "human", "value": question},
                {"from": "gpt", "value": common.answer_of_tokens(tokenizer, i, answer_tokens)},
            ]
        }
        if images:
            record["image"] = images if num_images > 1 else images[0]
        records.append(record)
    (data / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = data / "meta.json"
    meta.write_text(
        json.dumps({"mix": {"root": "images", "annotation": "records.jsonl", "data_augment": False, "repeat_time": 1}})
    )
    return {"model_dir": model_dir, "meta": meta}


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    from internvl_tune.config import SFTConfig, load_config
    from internvl_tune.recipes.sft import train
    from internvl_tune.training.metrics import read_metrics

    workdir = Path(args.workdir)
    out = workdir / "runs" / args.child
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"model.model_name_or_path={common.model_dir_for(args.shape, args.models, args.bf16)}",
        "model.grad_checkpoint=true",
        "model.drop_path_rate=0.0",
        f"model.freeze_backbone={str(args.freeze_backbone).lower()}",
        f"data.meta_path={workdir / 'data' / 'meta.json'}",
        f"data.max_dynamic_patch={args.max_dynamic_patch}",
        f"data.max_seq_length={args.max_seq_length}",
        f"train.output_dir={out}",
        "train.num_train_epochs=1",
        f"train.learning_rate={LEARNING_RATE}",
        "train.warmup_ratio=0.0",
        f"train.bf16={str(args.bf16).lower()}",
        f"train.seed={common.SEED}",
        "train.logging_steps=1",
    ]
    if args.child == "packed":
        overrides += [
            "data.packing=true",
            f"data.max_packed_tokens={args.max_packed_tokens}",
            "data.oversize_sample=alone",
            "train.per_device_train_batch_size=1",
        ]
    else:
        overrides += [f"train.per_device_train_batch_size={args.batch_size}"]
        overrides += ["data.group_by_length=true"] if args.child == "grouped" else []
    # The padded sampler drops an epoch's last partial batch; the same samples for all: a multiple of the batch.
    start = time.perf_counter()
    train(load_config(SFTConfig, None, overrides))
    rows = read_metrics(out / "metrics.jsonl")
    # The whole epoch: every configuration trains the same samples and labelled tokens, and pays its one warm-up
    # step (a first step left out would leave out a different share of the data in each).
    positions = sum(r["num_image_tokens"] + r["num_text_tokens"] for r in rows)
    padding = sum(
        r["padding_share"] * (r["num_image_tokens"] + r["num_text_tokens"]) / (1 - r["padding_share"]) for r in rows
    )
    epoch_s = sum(r["step_time_s"] for r in rows)
    return {
        "work_tflop": counted_work(args.shape, rows, args.freeze_backbone),
        "steps": len(rows),
        "loss_tokens": sum(r["num_loss_tokens"] for r in rows),
        "samples": sum(r["num_samples"] for r in rows),
        "epoch_s": epoch_s,
        "tokens_per_s": sum(r["num_loss_tokens"] for r in rows) / epoch_s,
        "padding_waste": padding / (positions + padding),
        "run_s": time.perf_counter() - start,
    }


def counted_work(shape: common.ModelShape, rows: list[dict], frozen_vit: bool = False) -> dict[str, float]:
    """TFLOP of the epoch's forward + backward per part (LLM attention not counted), from the step metrics."""
    image_tokens = sum(r["num_image_tokens"] for r in rows)
    real = image_tokens + sum(r["num_text_tokens"] for r in rows)
    positions = sum(
        (r["num_image_tokens"] + r["num_text_tokens"]) / (1 - r["padding_share"]) for r in rows
    )  # padding included
    tiles = image_tokens // shape.image_tokens_per_tile

    def trained(work: common.Work) -> float:  # forward + backward
        return 3 * common.forward_flops(shape, work) / 1e12

    vit = common.forward_flops(shape, common.Work(tiles, 0, 0, 0)) / 1e12 * (1 if frozen_vit else 3)
    return {
        "vit": vit,
        "llm": trained(common.Work(0, round(positions), 0, 0)),
        "llm_padding": trained(common.Work(0, round(positions - real), 0, 0)),
        "head": trained(common.Work(0, 0, 0, sum(r["num_loss_tokens"] for r in rows))),
    }


def work_lines(results: dict[str, dict], names: list[str]) -> list[str]:
    """The counted-work split of each run and the speed-up that removing padding alone would give."""
    done = [n for n in names if "work_tflop" in results.get(n, {})]
    if not done:
        return []
    lines = [
        "",
        "Counted work of the epoch, TFLOP (ViT attention counted, LLM attention not):",
        "",
        "| configuration | ViT + projector | LLM (of it padding) | LM head | total | padded total / this total |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    total = {n: sum(v for k, v in results[n]["work_tflop"].items() if k != "llm_padding") for n in done}
    for n in done:
        w = results[n]["work_tflop"]
        ratio = f"{total['padded'] / total[n]:.2f}" if "padded" in total else "-"
        lines.append(
            f"| {n} | {w['vit']:.1f} | {w['llm']:.1f} ({w['llm_padding']:.1f}) | {w['head']:.1f} | {total[n]:.1f} "
            f"| {ratio} |"
        )
    return lines


def report(args: argparse.Namespace, argv: list[str], results: dict[str, dict]) -> str:
    num_params = common.num_parameters(common.model_dir_for(args.shape, args.models, args.bf16))
    args.preset = args.preset or None
    lines = common.header_lines(
        "SFT packing benchmark: supervised tokens/s, packed vs padded vs length-grouped",
        "sft_packing.py",
        argv,
        args,
        num_params,
    )
    lines += [
        f"- Data: {args.num_samples} samples, answers log-normal (median {args.median_answer_tokens} tokens, sigma 1, "
        f"cap 2,000), 20% text-only, 10% with 2-3 images, else one image of 1-13 tiles; max_dynamic_patch "
        f"{args.max_dynamic_patch}",
        f"- Runs: one epoch each, {args.device}, {'bf16' if args.bf16 else 'fp32'}, gradient checkpointing, ViT "
        f"{'frozen' if args.freeze_backbone else 'trained'}, padded "
        f"and grouped batches of {args.batch_size} samples, packed rows of up to {args.max_packed_tokens} tokens "
        "(1 row per micro-batch)",
        "",
        "| configuration | supervised tokens/s | x padded | epoch s | padding waste | steps | samples | labelled tokens "
        "| peak memory | other busy cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = results.get("padded", {}).get("tokens_per_s")
    for name in args.names:
        r = results[name]
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}" if base else "-"
        lines.append(
            f"| {name} | {r['tokens_per_s']:.1f} | {ratio} | {r['epoch_s']:.0f} | {r['padding_waste']:.1%} | {r['steps']} "
            f"| {r['samples']} "
            f"| {r['loss_tokens']} | {common.mib(r['peak_memory_bytes'])} | {r.get('other_cpu_cores', 0):.2f} |"
        )
    lines += work_lines(results, args.names)
    if base and "packed" in results and "tokens_per_s" in results["packed"]:
        ratio = results["packed"]["tokens_per_s"] / base
        lines += ["", f"Target packed >= 2x padded: **{'met' if ratio >= 2 else 'not met'}** ({ratio:.2f}x)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        common.child_main(args, lambda: run_child(args), profile=False)
        return
    build_workload(args)
    results = {}
    for name in args.names:
        print(f"== {name}", flush=True)
        results[name] = common.spawn(__file__, name, argv, args)
        print(f"== {name}: {results[name]}", flush=True)
    text = report(args, argv, results)
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
