"""Metrics to a JSONL file (always) and TensorBoard (optional), from the main process only."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from internvl_tune.atomic import atomic_write_text


class MetricsWriter:
    """Appends one JSON line per logged step to `output_dir/metrics.jsonl`.

    A run that starts at `start_step` (a resume) first drops the rows after it, which the interrupted run wrote past
    its last checkpoint, so every step appears once: resumed at 4 after a crash at 6, rows 5 and 6 are written
    again, not twice.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool = True, tensorboard: bool = False, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            keep_rows_up_to(self.path, start_step)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("report_to=tensorboard needs: pip install 'internvl-tune[tensorboard]'") from e
            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
