"""`train.report_to`: the run's metrics and resolved config reach TensorBoard, W&B (offline) and MLflow through
accelerate, with the numbers metrics.jsonl holds; metrics.jsonl is written as always."""

from pathlib import Path

import pytest
from conftest import make_colour_dataset

from internvl_tune.cli import main
from internvl_tune.training.metrics import read_metrics

BASE = [
    "grad_checkpoint=false",
    "max_dynamic_patch=2",
    "max_seq_length=512",
    "per_device_train_batch_size=2",
    "max_steps=3",
    "logging_steps=1",
    "learning_rate=1e-3",
]


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("trackers")
    meta = make_colour_dataset(root / "data", num=4)
    path = root / "sft.yaml"
    path.write_text(f"model: {{model_name_or_path: {tiny_model_dir}}}\ndata: {{meta_path: {meta}}}\n")
    return path


def _train(config: Path, out: Path, report_to: str) -> list[dict]:
    assert main(["sft", "--config", str(config), *BASE, f"output_dir={out}", f"report_to={report_to}"]) == 0
    return read_metrics(out / "metrics.jsonl")


def test_tensorboard_gets_the_logged_losses(config, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _train(config, tmp_path / "run", "tensorboard")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]


def test_wandb_offline_run_gets_every_step_and_the_config(config, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # A spy on the real run (an offline run file has no Python reader since wandb 0.2x): what the run was given.
    runs, logged = [], []
    init, log = wandb.init, wandb.sdk.wandb_run.Run.log
    monkeypatch.setattr(wandb, "init", lambda *a, **k: runs.append(init(*a, **k)) or runs[-1])
    monkeypatch.setattr(
        wandb.sdk.wandb_run.Run, "log", lambda run, data, *a, **k: logged.append(data) or log(run, data, *a, **k)
    )
    rows = _train(config, tmp_path / "run", "wandb")
    assert [entry["loss"] for entry in logged] == pytest.approx([r["loss"] for r in rows], rel=1e-9)
    assert set(logged[0]) >= {"loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s"}
    (run,) = runs
    assert run.config["train.learning_rate"] == 1e-3 and run.project == "internvl-tune" and run.name == "run"
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.stat().st_size > 0


def test_mlflow_run_holds_every_step(config, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()  # a local store: the file backend needs mlflow's opt-in since 3.x
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    rows = _train(config, tmp_path / "run", "mlflow")
    client = MlflowClient(store)
    (experiment,) = [e for e in client.search_experiments() if e.name == "internvl-tune"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert run.data.params["train.learning_rate"] == "0.001"


def test_a_tracker_that_is_not_installed_is_one_line(config, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["sft", "--config", str(config), *BASE, f"output_dir={tmp_path}/run", "report_to=wandb"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: train.report_to=wandb needs wandb: pip install 'internvl-tune[wandb]'"
    )


@pytest.mark.parametrize(
    "environment, message",
    [
        ({}, "set MLFLOW_TRACKING_URI to your tracking server"),
        ({"MLFLOW_TRACKING_URI": "file:/tmp/x"}, "is a file store, which MLflow 3 refuses unless"),
    ],
)
def test_an_mlflow_store_mlflow_would_refuse_is_one_line_before_loading(
    config, tmp_path, capsys, monkeypatch, environment, message
):
    pytest.importorskip("mlflow")
    import importlib.util

    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    real = importlib.util.find_spec  # as with mlflow-skinny: no SQLAlchemy for the default store
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sqlalchemy" else real(name, *a))
    assert main(["sft", "--config", str(config), *BASE, f"output_dir={tmp_path}/run", "report_to=mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.report_to=mlflow: ") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # refused before the run started
