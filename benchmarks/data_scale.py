"""Start-up at data scale: time to the first step and peak RSS of real CLI runs on 20k to 1M (or 10M) records.

Run (CPU; the sizes are record counts, 10M is streamed to disk as the others are)::

    .venv/bin/python benchmarks/data_scale.py                      # 20k, 200k, 1M -> benchmarks/RESULTS-data-scale.md
    .venv/bin/python benchmarks/data_scale.py --sizes 2000 --report ''   # a quick look

Data (seeded, written line by line, so any size fits in memory): an SFT file of 80% single-image records (one of 64
small PNGs of six sizes, 1 to 7 tiles at `max_dynamic_patch` 6) and 20% text records, answers of 3 to 60 words; and a
preference file of the same mix (question, chosen, rejected). The model is the tiny random InternVL of the tests
(`save_tiny_model`), so what is timed is the data path, not the model.

Each configuration is its own process, the real CLI (`internvl-tune sft | mpo --config ... train.max_steps=1`, under
torchrun for 2 ranks, CPU / gloo; `internvl-tune check-data` for the check):

- `unpacked`: random batches, nothing measured;
- `packed cold`: `data.packing=true` with no length cache (deleted first): every record is measured, with
  `data.measure_workers` W per rank and R ranks (each rank its share);
- `packed warm`: the same run again, the cache written by the cold run read back;
- `check-data`: every record validated (its images decoded), with `--workers W`.

Columns: time to the first step (the process start until `metrics.jsonl` holds step 1: model and data loading,
measuring, planning, the step itself), the whole run's wall time, peak RSS (the largest resident set of any process
of the run: `os.wait4`'s `ru_maxrss` of the CLI and its descendants, so a rank or a worker when it is the largest),
and the measuring rate the run logged (`measured N sample lengths in T s (R records/s ...)`, per rank). The index
section builds the dataset, reads the warm cache and makes the packed sampler in this process and reports bytes per
record: the arrays' own bytes and the RSS they added.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402 (a sibling script module, not a package)

WORDS = common.WORDS
IMAGE_SIZES = [(56, 56), (112, 56), (56, 112), (90, 70), (168, 112), (200, 60)]
NUM_IMAGES = 64
IMAGE_SHARE = 0.8
DEFAULT_SIZES = "20000,200000,1000000"
# (ranks, measuring workers per rank) of the packed cold runs; packed warm and check-data run with those of the list's
# single-rank entries.
DEFAULT_COMBOS = "1x1,1x2,2x1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="record counts, comma-separated (10000000 streams 10M)")
    p.add_argument("--combos", default=DEFAULT_COMBOS, help="RANKSxWORKERS of the packed cold runs")
    p.add_argument("--kinds", default="sft,mpo", help="sft (SFT file), mpo (preference file), or both")
    p.add_argument(
        "--skip",
        default="",
        help="';'-separated parts of '<size> <kind> <configuration>' left out, e.g. '1M check-data;200k mpo packed'",
    )
    p.add_argument("--workdir", default="/tmp/internvl_tune_data_scale")
    p.add_argument("--report", default="benchmarks/RESULTS-data-scale.md", help="markdown report ('' = none)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    return p.parse_args(argv)


def write_records(path: Path, num: int, *, preference: bool, seed: int = common.SEED) -> None:
    """`num` records, one line each, written as they are drawn."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(num):
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
            image = rng.random() < IMAGE_SHARE
            question = "<image>\nWhat is in the picture?" if image else "Say something about shapes."
            if preference:
                other = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))
                record: dict[str, Any] = {"question": question, "chosen": answer, "rejected": other}
            else:
                record = {
                    "id": i,
                    "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                }
            if image:
                record["image"] = f"{rng.randrange(NUM_IMAGES)}.png"
            f.write(json.dumps(record) + "\n")


def make_data(workdir: Path, num: int, kind: str) -> Path:
    """`workdir/<kind>-<num>/meta.json` (made once; reruns reuse the records)."""
    from PIL import Image

    folder = workdir / f"{kind}-{num}"
    meta = folder / "meta.json"
    if meta.is_file():
        return meta
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k in range(NUM_IMAGES):
        Image.new("RGB", IMAGE_SIZES[k % len(IMAGE_SIZES)], (k * 4, 120, 200)).save(folder / "images" / f"{k}.png")
    write_records(folder / "records.jsonl", num, preference=kind == "mpo")
    spec = {"root": "images", "annotation": "records.jsonl", "repeat_time": 1, "max_dynamic_patch": 6}
    if kind == "sft":
        spec["data_augment"] = False
    meta.write_text(json.dumps({f"{kind}_{num}": spec}))
    return meta


def model_dir(workdir: Path) -> Path:
    path = workdir / "model"
    if not (path / "config.json").is_file():
        from internvl_tune.testing.tiny import save_tiny_model

        save_tiny_model(path, extra_texts=[" ".join(WORDS)])
    return path


def run_child(command: list[str], *, metrics: Path | None, timeout: float) -> dict[str, Any]:
    """Run `command`; its wall time, the time until `metrics` holds a line (the first step), peak RSS, stderr."""
    start = time.perf_counter()
    err_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"data_scale_{os.getpid()}.err"
    with open(err_path, "w") as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=child_env())
        first_step = None
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if first_step is None and metrics is not None and metrics.is_file() and metrics.stat().st_size:
                first_step = time.perf_counter() - start
            if time.perf_counter() - start > timeout:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.05)
    wall = time.perf_counter() - start
    stderr = err_path.read_text()
    err_path.unlink()
    code = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": wall,
        "first_step_s": first_step,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # kilobytes on Linux
        "returncode": code,
        "rates": [float(r) for r in re.findall(r"measured \d+ sample lengths in [\d.]+ s \((\d+) records/s", stderr)],
        "measured": [int(n) for n in re.findall(r"measured (\d+) sample lengths", stderr)],
        "stderr_tail": stderr[-2000:] if code else "",
    }


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env |= {
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "true",
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
    }
    return env


def cli(ranks: int) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "internvl_tune.cli"]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", "--nproc_per_node", str(ranks), "-m", "internvl_tune.cli"]


def train_run(kind: str, meta: Path, model: Path, out: Path, *, packed: bool, ranks: int, workers: int, timeout):
    config = out.with_suffix(".yaml")
    config.write_text(
        f"model: {{model_name_or_path: {model}, grad_checkpoint: false}}\n"
        f"data: {{meta_path: {meta}, packing: {str(packed).lower()}, measure_workers: {workers}}}\n"
        f"train: {{output_dir: {out}, max_steps: 1, overwrite_output_dir: true, save_total_limit: 0}}\n"
        + ("mpo: {}\n" if kind == "mpo" else "")
    )
    shutil.rmtree(out, ignore_errors=True)
    return run_child([*cli(ranks), kind, "--config", str(config)], metrics=out / "metrics.jsonl", timeout=timeout)


def check_run(kind: str, meta: Path, model: Path, *, workers: int, timeout) -> dict[str, Any]:
    command = [*cli(1), "check-data", str(meta), "--model", str(model), "--workers", str(workers)]
    return run_child(command + (["--preference"] if kind == "mpo" else []), metrics=None, timeout=timeout)


def index_bytes(meta: Path, model: Path, kind: str) -> dict[str, float]:
    """In a child: bytes per record of the record index, the counts and the packed sampler's plan (warm cache)."""
    code = f"""
import json, resource, sys
from internvl_tune.checkpoints.read import load_tokenizer, read_model_config
from internvl_tune.config import DataArgs
from internvl_tune.data.dataset import RecordDataset
from internvl_tune.data.lengths import dataset_lengths, tokenizer_fingerprint
from internvl_tune.data.packing import PackedBatchSampler, PackingSettings
from internvl_tune.data.preference import PairBuilder
from internvl_tune.data.transform import SampleBuilder
from internvl_tune.model.prepare import sample_settings

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

d = DataArgs(meta_path={str(meta)!r})
tokenizer = load_tokenizer({str(model)!r})
settings = sample_settings(d, read_model_config({str(model)!r}))
builder = SampleBuilder(tokenizer, settings)
builder = PairBuilder(builder) if {kind == "mpo"!r} else builder
before = rss()
dataset = RecordDataset(d.meta_path, builder, require_data_augment={kind == "sft"!r})
fingerprint = f"{{type(builder).__name__}}|{{settings!r}}|{{tokenizer_fingerprint(tokenizer)}}"
lengths = dataset_lengths(dataset, builder.measure, settings_fingerprint=fingerprint, skip_bad=False, progress=False)
packing = PackingSettings(d.max_packed_tokens, d.num_images_expected, d.max_buffer_size, d.oversize_sample)
sampler = PackedBatchSampler(lengths, 1, packing, seed=42)
sampler.statistics(0)
after = rss()
n = len(dataset)
arrays = sum(f._offsets.itemsize * len(f._offsets) * 2 for f in dataset.files) + dataset.index.nbytes + lengths.nbytes
arrays += sum(ids.nbytes + starts.nbytes for ids, starts in sampler._plans.values())
print(json.dumps({{"records": n, "array_bytes_per_record": arrays / n, "rss_bytes_per_record": (after - before) / n}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    combos = [tuple(int(x) for x in c.split("x")) for c in args.combos.split(",")]
    single_workers = sorted({w for r, w in combos if r == 1}) or [1]
    kinds = args.kinds.split(",")
    skip = {s.strip() for s in args.skip.split(";") if s.strip()}
    model = model_dir(workdir)
    results: dict[str, Any] = {"rows": [], "index": {}}
    uptime_before = os.getloadavg()
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for num in sizes:
        for kind in kinds:
            plan = [("unpacked", 1, 1)]
            plan += [(f"packed cold {r}x{w}", r, w) for r, w in combos]
            plan += [(f"packed warm 1x{w}", 1, w) for w in single_workers]
            plan += [(f"check-data {w} worker{'s' if w > 1 else ''}", 1, w) for w in single_workers]
            plan = [p for p in plan if not any(left_out in f"{label(num)} {kind} {p[0]}" for left_out in skip)]
            if not plan:
                continue
            start = time.perf_counter()
            meta = make_data(workdir, num, kind)
            print(f"{kind} {label(num)}: data ready in {time.perf_counter() - start:.0f} s", flush=True)
            cache = meta.parent / ".internvl_tune_cache"
            out = workdir / "runs" / f"{kind}-{num}"
            out.parent.mkdir(exist_ok=True)
            for name, ranks, workers in plan:
                if name.startswith("packed cold"):
                    shutil.rmtree(cache, ignore_errors=True)
                if name.startswith("check-data"):
                    row = check_run(kind, meta, model, workers=workers, timeout=args.timeout)
                else:
                    row = train_run(
                        kind,
                        meta,
                        model,
                        out,
                        packed=name != "unpacked",
                        ranks=ranks,
                        workers=workers,
                        timeout=args.timeout,
                    )
                row |= {"kind": kind, "records": num, "config": name, "load": os.getloadavg()[0]}
                results["rows"].append(row)
                first = f"{row['first_step_s']:.1f} s" if row["first_step_s"] else "-"
                print(
                    f"  {name:24s} first step {first:>9s}  wall {row['wall_s']:7.1f} s  peak RSS "
                    f"{row['peak_rss_mib']:7.0f} MiB  rates {row['rates']}  rc {row['returncode']}",
                    flush=True,
                )
                if row["returncode"]:
                    print(row["stderr_tail"], flush=True)
            if cache.is_dir() and any(name.startswith("packed") for name, *_ in plan):
                results["index"][f"{kind} {label(num)}"] = index_bytes(meta, model, kind)
    results |= {"argv": argv, "began": began, "load_before": uptime_before, "load_after": os.getloadavg()}
    (workdir / "results.json").write_text(json.dumps(results, indent=1))
    common.write_report(args.report, report(results))
    return results


def report(results: dict[str, Any]) -> str:
    argv = results["argv"]
    lines = [
        "# Data at scale: start-up time and peak RSS",
        "",
        f"Command: `python benchmarks/data_scale.py{''.join(' ' + a for a in argv)}`",
        "",
        f"- Date: {results['began']} (start)",
        f"- Machine: {common.machine('cpu')}; {len(os.sched_getaffinity(0))} cores available",
        f"- Load average (1 min) before / after: {results['load_before'][0]:.2f} / {results['load_after'][0]:.2f}"
        " (other jobs share the machine; each row gives the load at its end)",
        f"- Versions: {common.versions()}",
        "- Model: the tests' tiny random InternVL; data: 80% single-image, 20% text (module docstring)",
        "",
        "| data | records | configuration (ranks x workers) | first step (s) | wall (s) | peak RSS (MiB) | "
        "measuring rate per rank (records/s) | load |",
        "|---|---:|---|---:|---:|---:|---|---:|",
    ]
    for row in results["rows"]:
        first = f"{row['first_step_s']:.1f}" if row["first_step_s"] else "-"
        rates = ", ".join(f"{r:,.0f}" for r in row["rates"]) or "-"
        failed = "" if not row["returncode"] else f" (exit {row['returncode']})"
        lines.append(
            f"| {row['kind']} | {label(row['records'])} | {row['config']}{failed} | {first} | {row['wall_s']:.1f} | "
            f"{row['peak_rss_mib']:,.0f} | {rates} | {row['load']:.1f} |"
        )
    if results["index"]:
        lines += [
            "",
            "Index bytes per record (record index, line offsets, counts, one epoch's packed plan; warm cache):",
            "",
            "| data | records | array bytes / record | RSS added / record |",
            "|---|---:|---:|---:|",
        ]
        for name, row in results["index"].items():
            lines.append(
                f"| {name} | {row['records']:,} | {row['array_bytes_per_record']:.1f} | "
                f"{row['rss_bytes_per_record']:.1f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
