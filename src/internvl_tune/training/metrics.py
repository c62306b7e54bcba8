"""Metrics to a JSONL file (always) and to the run's tracker (TensorBoard, W&B, MLflow: optional, through accelerate),
from the main process only."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from internvl_tune.atomic import atomic_write_text
from internvl_tune.config import TrainArgs

if TYPE_CHECKING:  # `plot` reads metrics.jsonl through this module without torch (tests/unit/test_cli_imports.py)
    import torch
    from accelerate import Accelerator

TRACKER_PROJECT = "internvl-tune"  # the W&B project and MLflow experiment unless their environment names one


class MetricsWriter:
    """Appends one JSON line per logged step to `output_dir/metrics.jsonl`, and logs the same numbers to the
    accelerator's tracker when the run has one (`start_tracker`).

    A run that starts at `start_step` (a resume) first drops the rows after it, which the interrupted run wrote past
    its last checkpoint, so every step appears once: resumed at 4 after a crash at 6, rows 5 and 6 are written
    again, not twice (TensorBoard purges them the same way).
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, start_step: int = 0, tracker=None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tracker = tracker  # the accelerator whose tracker `start_tracker` started, or None
        if enabled:
            keep_rows_up_to(self.path, start_step)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tracker is not None:
            numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.tracker.log(numbers, step=step)


def start_tracker(accelerator, report_to: str, output_dir: str | Path, config: dict[str, Any], start_step: int):
    """Start `train.report_to`'s tracker on the accelerator (made with `log_with=report_to`, `project_dir=output_dir`)
    and record the run's resolved config in it, flattened to `section.field` values; returns the accelerator to give
    `MetricsWriter` as its tracker, or None when the run reports to no tracker."""
    if report_to == "none" or not accelerator.is_main_process:  # accelerate would start a W&B run on every rank
        return None
    output_dir = Path(output_dir)
    name = output_dir.resolve().name
    if report_to == "tensorboard":
        project, init = "tensorboard", {"purge_step": start_step + 1}  # output_dir/tensorboard
    elif report_to == "wandb":
        project, init = os.environ.get("WANDB_PROJECT", TRACKER_PROJECT), {"name": name, "dir": str(output_dir)}
    else:
        # The tracking server or store is mlflow's own setting ($MLFLOW_TRACKING_URI), not the run's.
        project, init = os.environ.get("MLFLOW_EXPERIMENT_NAME", TRACKER_PROJECT), {"run_name": name}
    flat = {
        f"{section}.{key}": value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
        for section, fields in config.items()
        for key, value in fields.items()
    }
    accelerator.init_trackers(project, config=flat, init_kwargs={report_to: init})
    return accelerator


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def keep_rows_up_to(path: Path, step: int) -> None:
    """Rewrite `path` with its rows of steps <= `step` (a line cut by a crash goes too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(line)["step"] <= step and line.endswith("\n"):
                kept.append(line)
    atomic_write_text(path, "".join(kept))


def step_totals(accelerator: Accelerator, counts: list[int | float]) -> list[int | float]:
    """Counts known on this rank's CPU (samples, tokens, loss-weight sums) summed over all ranks, each keeping its
    type. One process reads nothing back from the device; several make one small all-reduce per step, the one host
    sync a step needs (its denominators)."""
    if accelerator.num_processes == 1:
        return list(counts)
    import torch

    summed = accelerator.reduce(torch.tensor(counts, dtype=torch.float64, device=accelerator.device), "sum").tolist()
    return [type(c)(v) if isinstance(c, float) else round(v) for c, v in zip(counts, summed, strict=True)]


def is_logging_step(step: int, t: TrainArgs, total_steps: int) -> bool:
    """Whether optimizer step `step` (1-based) logs: metrics are read from the device only on these steps."""
    return step % t.logging_steps == 0 or step == total_steps


def read_step_metrics(accelerator: Accelerator, sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """The step's metric sums (device tensors accumulated over its micro-batches), summed over ranks and read in
    one transfer: the only time a logging step waits for the device."""
    import torch

    names = set(sums)
    if accelerator.num_processes > 1:
        # A rank that trained nothing this step (skipped samples, past the end of a packed epoch) has no sums: every
        # rank must reduce the same names, a missing one counting 0.
        everyone: list = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(everyone, sorted(names))
        names = set().union(*everyone)
    names = sorted(names)
    if not names:
        return {}
    zero = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    stacked = torch.stack([sums[n].detach().to(torch.float64).reshape(()) if n in sums else zero for n in names])
    return dict(zip(names, accelerator.reduce(stacked, "sum").tolist(), strict=True))


def throughput_metrics(
    accelerator: Accelerator, batches: list[dict[str, Any]], elapsed: float, *, num_samples: int, num_loss_tokens: int
) -> dict[str, float]:
    """The metrics both recipes log under the same names (docs/metrics.md): counts over the step's micro-batches on
    all ranks (an MPO sample is a pair) and rates over the step's wall time."""
    real = [b for b in batches if "input_ids" in b]
    num_image_tokens, num_text_tokens, num_pad_tokens, num_positions = step_totals(
        accelerator,
        [
            sum(b["num_image_tokens"] for b in real),
            sum(b["num_text_tokens"] for b in real),
            sum(b["num_pad_tokens"] for b in real),
            sum(b["input_ids"].numel() for b in real),
        ],
    )
    return {
        "num_samples": num_samples,
        "num_loss_tokens": num_loss_tokens,
        "num_image_tokens": num_image_tokens,
        "num_text_tokens": num_text_tokens,
        "padding_share": num_pad_tokens / max(1, num_positions),
        "samples_per_s": num_samples / elapsed,
        "loss_tokens_per_s": num_loss_tokens / elapsed,
        "tokens_per_s": (num_image_tokens + num_text_tokens) / elapsed,
        "vision_tokens_per_s": num_image_tokens / elapsed,
        "text_tokens_per_s": num_text_tokens / elapsed,
        "step_time_s": elapsed,
    }
