"""Metrics to a JSONL file (always) and to the run's tracker (TensorBoard, W&B, MLflow: optional, through accelerate),
from the main process only."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from internvl_tune.atomic import atomic_write_text

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
