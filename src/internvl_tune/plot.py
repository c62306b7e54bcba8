"""Pictures of runs: `internvl-tune plot RUN_DIR` draws a run's `metrics.jsonl` (SFT or MPO) into one PNG, and the
demo's `curves.png` is saved the same way. matplotlib is optional: `pip install "internvl-tune[plot]"`.

One panel per group of metrics that the run logged (the names of docs/metrics.md), against the step:

    loss              loss, and MPO's terms loss/<type> (unweighted); log scale
    rewards           rewards/chosen, rewards/rejected, rewards/margins, delta (MPO)
    reward accuracy   rewards/accuracies (MPO)
    learning rate     lr
    gradient norm     grad_norm
    samples / s       samples_per_s (MPO: pairs / s)
    tokens / s        tokens_per_s, vision_tokens_per_s, text_tokens_per_s

A panel none of whose metrics the run logged is left out, so an SFT run gets five and an MPO run seven.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from internvl_tune.atomic import atomic_write_bytes
from internvl_tune.errors import MissingPathError, UserError
from internvl_tune.training.metrics import read_metrics

PLOT_EXTRA = 'pip install "internvl-tune[plot]"'
METRICS_FILE = "metrics.jsonl"
DEFAULT_PLOT_NAME = "metrics.png"

# (title, metric names); "loss" also takes every `loss/<type>` name the run logged.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins", "delta")),
    ("reward accuracy", ("rewards/accuracies",)),
    ("learning rate", ("lr",)),
    ("gradient norm", ("grad_norm",)),
    ("samples / s", ("samples_per_s",)),
    ("tokens / s", ("tokens_per_s", "vision_tokens_per_s", "text_tokens_per_s")),
)
_COLUMNS = 3


def import_pyplot():
    """matplotlib.pyplot on its file-only backend (no display needed); a UserError naming the extra to install
    when matplotlib is missing (the CLI prints it as its one error line)."""
    try:
        import matplotlib
    except ImportError as e:
        raise UserError(f"plotting needs matplotlib: {PLOT_EXTRA}") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG through a temporary file and a rename, and close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def metric_panels(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, tuple[list[int], list[float]]]]]:
    """The panels of `PANELS` that `rows` (metrics.jsonl lines) have values for: (title, {name: (steps, values)}).
    A `null` value (grad_norm without clipping) is left out of its curve.

    Example:
        [{"step": 1, "loss": 2.0, "lr": 1e-5, "grad_norm": None}, {"step": 2, "loss": 1.5, "lr": 0.0, "grad_norm": None}]
        -> [("loss", {"loss": ([1, 2], [2.0, 1.5])}), ("learning rate", {"lr": ([1, 2], [1e-05, 0.0])})]
    """
    logged = {name for row in rows for name, value in row.items() if isinstance(value, (int, float))}
    terms = tuple(sorted(name for name in logged if name.startswith("loss/")))
    panels = []
    for title, names in PANELS:
        curves = {}
        for name in names + (terms if title == "loss" else ()):
            points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))]
            if points:
                steps, values = zip(*points, strict=True)
                curves[name] = (list(steps), list(values))
        if curves:
            panels.append((title, curves))
    return panels


def metrics_path(run: str | Path) -> Path:
    """`run/metrics.jsonl` for a run folder, or `run` itself when it names the file."""
    run = Path(run)
    path = run / METRICS_FILE if run.is_dir() else run
    if not path.is_file():
        raise MissingPathError(f"{path}: no such file (a run folder of `sft` or `mpo` holds {METRICS_FILE})")
    return path


def plot_metrics(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw the metrics of a run (its folder or its metrics.jsonl) into `out` (default: `metrics.png` beside the
    metrics file); returns the PNG's path."""
    path = metrics_path(run)
    panels = metric_panels(read_metrics(path))
    if not panels:
        raise UserError(f"{path}: no logged step to plot")
    plt = import_pyplot()
    num_rows = -(-len(panels) // _COLUMNS)
    fig, axes = plt.subplots(num_rows, _COLUMNS, figsize=(5 * _COLUMNS, 3.6 * num_rows), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels, strict=False):
        for name, (steps, values) in curves.items():
            ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
        ax.set(title=title, xlabel="step")
        if title == "loss" and all(v > 0 for _, values in curves.values() for v in values):
            ax.set_yscale("log")  # a loss falls by orders of magnitude; its late steps would be a flat line
        if len(curves) > 1:
            ax.legend(fontsize="small")
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(str(path.parent))
    fig.tight_layout()
    return save_figure(fig, out if out is not None else path.parent / DEFAULT_PLOT_NAME)
