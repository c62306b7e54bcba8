"""`internvl-tune plot`: which panels a run's metrics.jsonl gets, and the one-line errors. (Real SFT and MPO runs are
plotted in tests/recipes/test_first_try.py.)"""

import json
import sys

import pytest

from internvl_tune.cli import main
from internvl_tune.plot import metric_panels

SFT_ROWS = [
    {"step": 1, "loss": 2.0, "lr": 1e-5, "grad_norm": None, "samples_per_s": 3.0, "epoch": 0.5},
    {"step": 2, "loss": 1.5, "lr": 5e-6, "grad_norm": None, "samples_per_s": 4.0, "epoch": 1.0},
]


def test_panels_are_the_logged_groups_in_order_and_nulls_are_left_out():
    panels = metric_panels(SFT_ROWS)
    # grad_norm is null without clipping: no panel; epoch is in no panel.
    assert panels == [
        ("loss", {"loss": ([1, 2], [2.0, 1.5])}),
        ("learning rate", {"lr": ([1, 2], [1e-5, 5e-6])}),
        ("samples / s", {"samples_per_s": ([1, 2], [3.0, 4.0])}),
    ]


def test_mpo_rows_get_their_loss_terms_rewards_and_accuracy():
    rows = [
        {"step": 1, "loss": 1.0, "loss/sigmoid": 0.7, "loss/sft": 2.0, "rewards/margins": 0.1, "delta": 0.0},
        {"step": 2, "loss": 0.9, "loss/sigmoid": 0.6, "rewards/margins": 0.2, "rewards/accuracies": 1.0, "delta": 1.0},
    ]
    panels = dict(metric_panels(rows))
    assert list(panels) == ["loss", "rewards", "reward accuracy"]
    # A term logged at one step only has a curve of one point, at its step.
    assert panels["loss"] == {
        "loss": ([1, 2], [1.0, 0.9]),
        "loss/sft": ([1], [2.0]),
        "loss/sigmoid": ([1, 2], [0.7, 0.6]),
    }
    assert panels["rewards"] == {"rewards/margins": ([1, 2], [0.1, 0.2]), "delta": ([1, 2], [0.0, 1.0])}
    assert panels["reward accuracy"] == {"rewards/accuracies": ([2], [1.0])}


def test_plot_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tmp_path}/metrics.jsonl: no such file (a run folder of `sft` or `mpo` holds metrics.jsonl)\n"
    )
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}/metrics.jsonl: no logged step to plot\n"

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in SFT_ROWS))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed: its import fails
    assert main(["plot", str(tmp_path)]) == 2
    assert capsys.readouterr().err == 'error: plotting needs matplotlib: pip install "internvl-tune[plot]"\n'
    assert not (tmp_path / "metrics.png").exists()


def test_plot_writes_the_png_where_asked(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("".join(json.dumps(row) + "\n" for row in SFT_ROWS))
    assert main(["plot", str(metrics), "--out", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'a.png'}\n"
    with Image.open(tmp_path / "a.png") as image:
        assert image.format == "PNG" and image.size == (1500, 360)  # 3 panels: one row of three
