"""DDP, FSDP2, ZeRO-2 and ZeRO-3 on 2 CPU ranks (gloo) train exactly as one process with the same global batch.

Each engine runs from the shipped file in configs/accelerate/ through `accelerate launch`, with the test-only switch
INTERNVL_TUNE_SHARD_ON_CPU=1 (docs/distributed.md): accelerate turns FSDP and DeepSpeed on only for GPUs, and
without it these runs would silently be DDP. That they are not is measured: `summary.json`'s engine report gives
each rank's bytes of parameters and of Adam's moments, about half of one process's under FSDP2 and ZeRO-3.

The one difference from the shipped files: ZeRO-3 runs with `stage3_param_persistence_threshold: 0`. The shipped
1e7 (the original InternVL value) keeps every tensor under 10M elements whole on every rank, which is every tensor
of a tiny model, so nothing would be partitioned (`test_shipped_zero3_keeps_a_tiny_model_whole` shows it).

Tolerances (fp32): losses rel 1e-5; gradient norms rel 1e-4 and final weights abs 1e-5, as for DDP
(test_ddp.py): each rank sums its sample's gradient before the all-reduce, one process sums both inside one
matmul, and Adam's step on gradients near eps amplifies that rounding. A resume equals the straight run to 1e-6.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_colour_dataset, make_pair_dataset
from safetensors.torch import load_file

from internvl_tune.training.checkpoint import checkpoint_problem
from internvl_tune.training.metrics import read_metrics

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "configs" / "accelerate"
ENGINES = ["ddp", "fsdp2", "zero2", "zero3"]
SHARDED = ["fsdp2", "zero2", "zero3"]
NAMES = {"ddp": "DDP", "fsdp2": "FSDP2", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3"}


def accelerate_file(engine: str, folder: Path) -> Path:
    """The shipped accelerate file of `engine`; for ZeRO-3, a copy whose JSON partitions every tensor (see above)."""
    shipped = SHIPPED / f"{engine}.yaml"
    if not engine.startswith("zero3"):
        return shipped
    config = json.loads((SHIPPED / f"{engine}.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{engine}_ci.json").write_text(json.dumps(config))
    text = shipped.read_text().replace(f"configs/accelerate/{engine}.json", str(folder / f"{engine}_ci.json"))
    assert text != shipped.read_text()
    (folder / f"{engine}_ci.yaml").write_text(text)
    return folder / f"{engine}_ci.yaml"


def run(config: Path, *overrides: str, command: str = "sft", accelerate: Path | None = None, ranks: int = 2) -> None:
    """`internvl-tune COMMAND`: in one plain process, or under `accelerate launch` with `ranks` CPU ranks."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.pop("ACCELERATE_USE_CPU", None)
    env |= {"CUDA_VISIBLE_DEVICES": "", "INTERNVL_TUNE_SHARD_ON_CPU": "1", "OMP_NUM_THREADS": "1"}
    cli = ["-m", "internvl_tune.cli", command, "--config", str(config), *overrides]
    if accelerate is None:
        argv = [sys.executable, *cli]
    else:
        launcher = Path(sys.executable).with_name("accelerate")
        argv = [str(launcher), "launch", "--config_file", str(accelerate), "--num_processes", str(ranks), *cli]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def rows(folder: Path) -> list[dict]:
    return read_metrics(folder / "metrics.jsonl")


def engine_report(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())["engine"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_training(two: Path, one: Path, loss_rel: float = 1e-5) -> None:
    a, b = rows(two), rows(one)
    assert len(a) == len(b)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=loss_rel)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)  # the same names, as transformers expects them
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def assert_sharded(engine: str, report: dict, single: dict) -> None:
    """Each rank's share of one process's bytes: about 1/2 where the engine shards them, all of it where not."""
    assert report["engine"] == NAMES[engine] and report["num_processes"] == 2
    (params,), (moments,) = single["parameter_bytes_per_rank"], single["optimizer_bytes_per_rank"]
    shares = (
        [b / params for b in report["parameter_bytes_per_rank"]],
        [b / moments for b in report["optimizer_bytes_per_rank"]],
    )
    param_sharded = engine in ("fsdp2", "zero3")
    moments_sharded = engine != "ddp"
    for share in shares[0]:
        assert share == pytest.approx(0.5, abs=0.05) if param_sharded else share == pytest.approx(1.0)
    for share in shares[1]:
        assert share == pytest.approx(0.5, abs=0.05) if moments_sharded else share == pytest.approx(1.0)
    if engine == "fsdp2":
        assert report["fsdp_units"] == 2 + 2 + 1  # each decoder layer, each ViT layer, and the root


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_model_dir):
    """SFT config (fp32) and its one-process run: batch 2 x accumulation 2, 5 steps, checkpoint at step 3."""
    root = tmp_path_factory.mktemp("sharded_sft")
    meta = make_colour_dataset(root / "data", num=24)
    config = root / "sft.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false}}\n"
        f"data: {{meta_path: {meta}, max_dynamic_patch: 4}}\n"
        "train: {max_steps: 5, learning_rate: 2.0e-3, warmup_ratio: 0.0, gradient_accumulation_steps: 2,\n"
        "        save_steps: 3, bf16: false}\n"
    )
    run(config, f"output_dir={root / 'one'}", "per_device_train_batch_size=2")
    return root, config


@pytest.mark.parametrize("engine", ENGINES)
def test_sft_two_ranks_equal_one_rank_save_and_resume_exactly(sft, engine):
    """2 ranks x 1 sample x accumulation 2 == 1 rank x 2 samples x accumulation 2: losses, gradient norms, `final/`
    (which plain transformers loads); each rank holds its share; a resume from step 3 equals the straight run."""
    from transformers import AutoModelForImageTextToText

    root, config = sft
    accelerate = accelerate_file(engine, root / engine)
    two, resumed = root / engine / "two", root / engine / "resumed"
    run(config, f"output_dir={two}", "per_device_train_batch_size=1", accelerate=accelerate)
    assert_same_training(two, root / "one")
    assert_sharded(engine, engine_report(two), engine_report(root / "one"))
    # ZeRO-3 ends 2e-5 (rel 6e-5 of the tensors' norms) from one process after 5 steps, the others within 1e-5:
    # an open question (docs/distributed.md), not hidden by a looser bound for every engine.
    assert_same_weights(
        weights(two / "final"), weights(root / "one" / "final"), atol=5e-5 if engine == "zero3" else 1e-5
    )
    # final/ is a plain transformers folder: it loads without warnings of missing or unexpected weights.
    model, info = AutoModelForImageTextToText.from_pretrained(two / "final", output_loading_info=True)
    assert not any(info.values()), info
    # The step checkpoint, written by both ranks into the main process's temporary folder, is complete.
    assert checkpoint_problem(two / "checkpoint-3") is None
    assert not [p for p in two.iterdir() if p.name.startswith(".")]

    run(
        config,
        f"output_dir={resumed}",
        "per_device_train_batch_size=1",
        f"resume_from_checkpoint={two / 'checkpoint-3'}",
        accelerate=accelerate,
    )
    assert [r["step"] for r in rows(resumed)] == [4, 5]
    assert [r["loss"] for r in rows(resumed)] == pytest.approx([r["loss"] for r in rows(two)[3:]], abs=1e-6)
    assert_same_weights(weights(resumed / "final"), weights(two / "final"), atol=1e-6)


def test_shipped_zero3_keeps_a_tiny_model_whole(sft):
    """Why the ZeRO-3 tests lower the persistence threshold: the shipped files (1e7, as the original's) leave every
    tensor of a tiny model whole on each rank. It trains the same all the same; offload runs too (pin_memory
    as shipped)."""
    root, config = sft
    two = root / "zero3_offload_shipped"
    run(
        config,
        f"output_dir={two}",
        "per_device_train_batch_size=1",
        "max_steps=2",
        accelerate=SHIPPED / "zero3_offload.yaml",
    )
    report = engine_report(two)
    assert report["engine"] == "ZeRO-3"
    assert report["parameter_bytes_per_rank"] == engine_report(root / "one")["parameter_bytes_per_rank"] * 2
    assert_same_training_prefix(two, root / "one", 2)


def assert_same_training_prefix(two: Path, one: Path, steps: int) -> None:
    a, b = rows(two), rows(one)[:steps]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)


@pytest.mark.parametrize("engine", ["fsdp2_offload", "zero3_offload"])
def test_offloaded_engines_equal_one_rank(sft, engine):
    """Parameters (and, for ZeRO-3, optimizer states) in CPU memory: the same training. FSDP2's offload runs here
    without pinned memory (there is no accelerator to pin for)."""
    root, config = sft
    two = root / engine
    run(
        config,
        f"output_dir={two}",
        "per_device_train_batch_size=1",
        "max_steps=2",
        accelerate=accelerate_file(engine, root / f"{engine}_files"),
    )
    assert_same_training_prefix(two, root / "one", 2)
    single = engine_report(root / "one")
    for share in engine_report(two)["optimizer_bytes_per_rank"]:
        assert share / single["optimizer_bytes_per_rank"][0] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("engine", SHARDED)
def test_packed_sft_two_ranks_equal_one_rank(sft, tiny_model_dir, engine):
    """Packed rows (square loss weights): 2 ranks x 1 row == 1 rank x 1 row x accumulation 2, as for DDP."""
    root, _ = sft
    folder = root / "packed"
    config = folder / "packed.yaml"
    if not config.exists():
        meta = make_colour_dataset(folder / "data", num=12)
        config.write_text(
            f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false}}\n"
            f"data: {{meta_path: {meta}, max_dynamic_patch: 4, packing: true, max_packed_tokens: 600}}\n"
            "train: {max_steps: 3, learning_rate: 2.0e-3, warmup_ratio: 0.0, per_device_train_batch_size: 1,\n"
            "        loss_reduction: square, bf16: false}\n"
        )
        run(config, f"output_dir={folder / 'one'}", "gradient_accumulation_steps=2")
    run(config, f"output_dir={folder / engine}", accelerate=accelerate_file(engine, folder / f"{engine}_files"))
    assert_same_training(folder / engine, folder / "one")
    assert [r["num_samples"] for r in rows(folder / engine)] == [r["num_samples"] for r in rows(folder / "one")]


@pytest.mark.parametrize("engine", SHARDED)
def test_lora_sft_then_merge_equals_one_rank(sft, tiny_model_dir, engine):
    """LoRA on the LLM: `final_adapter/` gathered from the shards, merged by `export --merge-lora`, equals the
    one-process run's merge; `final/` (merged at save) too. A resume from the LoRA checkpoint is exact."""
    root, config = sft
    folder = root / "lora"
    lora = ("use_llm_lora=8", "lora_dropout=0.0", "max_steps=4", "save_steps=2")  # no dropout: ranks draw other masks
    if not (folder / "one").exists():
        run(config, f"output_dir={folder / 'one'}", "per_device_train_batch_size=2", *lora)
        run_export(folder / "one")
    two = folder / engine
    accelerate = accelerate_file(engine, folder / f"{engine}_files")
    run(config, f"output_dir={two}", "per_device_train_batch_size=1", *lora, accelerate=accelerate)
    assert_same_training(two, folder / "one")
    run_export(two)
    assert_same_weights(weights(two / "merged"), weights(folder / "one" / "merged"))
    assert_same_weights(weights(two / "final"), weights(folder / "one" / "final"))

    resumed = folder / f"{engine}_resumed"
    run(
        config,
        f"output_dir={resumed}",
        "per_device_train_batch_size=1",
        *lora,
        f"resume_from_checkpoint={two / 'checkpoint-2'}",
        accelerate=accelerate,
    )
    assert [r["loss"] for r in rows(resumed)] == pytest.approx([r["loss"] for r in rows(two)[2:]], abs=1e-6)


def run_export(run_dir: Path) -> None:
    cli = [sys.executable, "-m", "internvl_tune.cli", "export", str(run_dir / "final_adapter"), str(run_dir / "merged")]
    result = subprocess.run([*cli, "--merge-lora"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def mpo(tmp_path_factory, tiny_model_dir):
    """MPO config (fp32, sigmoid + bco_pair with δ + sft) and its one-process runs for each reference mode:
    1 rank x 2 pairs x accumulation 2 (the equivalence test_ddp.py explains)."""
    root = tmp_path_factory.mktemp("sharded_mpo")
    meta = make_pair_dataset(root / "data", num=12)
    config = root / "mpo.yaml"
    config.write_text(
        f"model: {{model_name_or_path: {tiny_model_dir}, grad_checkpoint: false, drop_path_rate: 0.0}}\n"
        f"data: {{meta_path: {meta}, max_dynamic_patch: 4}}\n"
        "train: {max_steps: 2, learning_rate: 5.0e-3, warmup_ratio: 0.0, gradient_accumulation_steps: 2, bf16: false}\n"
    )
    for mode in ("copy", "lora_disabled", "precomputed"):
        run_mpo(config, root / mode / "one", mode, "per_device_train_batch_size=2")
    return root, config


def run_mpo(config: Path, out: Path, mode: str, *overrides: str, accelerate: Path | None = None) -> None:
    args = [f"output_dir={out}", f"reference={mode}", *overrides]
    if mode == "lora_disabled":
        args += ["use_llm_lora=8", "lora_dropout=0.0"]  # dropout masks differ between 1 and 2 ranks
    if mode == "precomputed":
        # The reference log-probs, computed sharded as the training runs.
        args.append(f"reference_cache={out.parent / (out.name + '_reference.pt')}")
        run(config, *args, command="precompute-ref", accelerate=accelerate)
    run(config, *args, command="mpo", accelerate=accelerate)


@pytest.mark.parametrize("mode", ["copy", "lora_disabled", "precomputed"])
@pytest.mark.parametrize("engine", SHARDED)
def test_mpo_two_ranks_equal_one_rank_for_each_reference(mpo, engine, mode):
    """The frozen copy is sharded like the policy (FSDP2 units; a ZeRO-3 inference engine), the LoRA-disabled
    policy and the precomputed log-probs need no second model; each gives the one-process losses, gradient norms
    and δ."""
    root, config = mpo
    two = root / mode / engine
    run_mpo(
        config, two, mode, "per_device_train_batch_size=1", accelerate=accelerate_file(engine, root / f"{engine}_files")
    )
    # ZeRO-3's open 1e-5-level difference (docs/distributed.md), grown by MPO's larger learning rate: rel 1e-4 there.
    rel = 1e-4 if engine == "zero3" else 1e-5
    assert_same_training(two, root / mode / "one", loss_rel=rel)
    assert [r["delta"] for r in rows(two)] == pytest.approx([r["delta"] for r in rows(root / mode / "one")], rel=rel)
    assert rows(two)[-1]["delta"] != 0.0


def test_a_resume_under_another_engine_is_refused_in_one_line(sft):
    """A ZeRO-3 checkpoint cannot be read by FSDP2 (each engine writes its own files): one line, before loading."""
    root, config = sft
    zero3 = root / "zero3" / "two"
    if not (zero3 / "checkpoint-3").is_dir():
        pytest.skip("needs the ZeRO-3 run of test_sft_two_ranks_equal_one_rank_save_and_resume_exactly")
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env |= {"CUDA_VISIBLE_DEVICES": "", "INTERNVL_TUNE_SHARD_ON_CPU": "1", "OMP_NUM_THREADS": "1"}
    launcher = Path(sys.executable).with_name("accelerate")
    result = subprocess.run(
        [str(launcher), "launch", "--config_file", str(SHIPPED / "fsdp2.yaml"), "--num_processes", "2"]
        + ["-m", "internvl_tune.cli", "sft", "--config", str(config)]
        + [f"output_dir={root / 'switched'}", "per_device_train_batch_size=1"]
        + [f"resume_from_checkpoint={zero3 / 'checkpoint-3'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode != 0
    assert "was saved by ZeRO-3 on 2 ranks and this run is FSDP2" in result.stderr
    # accelerate's launcher reports the failed ranks with its own traceback; no frame of ours is in it.
    assert "internvl_tune/" not in result.stderr


@pytest.fixture()
def rollout_server(tmp_path, tiny_model_dir):
    """serve.py in its own process on a copy of the tiny model, one request per generate call (--batch-size = G),
    so a response does not depend on which rank asked or what else was in flight; `reset()` puts the starting
    weights back (a run's pushes overwrite them)."""
    import shutil
    import socket
    import time
    import urllib.request

    served = tmp_path / "served"
    shutil.copytree(tiny_model_dir, served)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env |= {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "internvl_tune.generation.serve", str(served), "--port", str(port), "--batch-size", "4"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=5).read()
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "serve.py did not start"
            time.sleep(0.5)

    def reset():
        shutil.rmtree(served)
        shutil.copytree(tiny_model_dir, served)
        request = urllib.request.Request(url + "/reload_weights", data=b"{}", method="POST")
        urllib.request.urlopen(request, timeout=60).read()

    try:
        yield url, served, reset
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_rl_with_server_rollouts_two_sharded_ranks_equal_one_process(tmp_path, rollout_server, monkeypatch):
    """Online RL with rollouts from a server (serve.py, pushed after each step) under FSDP2 and ZeRO-3 on 2 ranks
    equals one process: the same responses (so each push reached the server), rewards, losses, ratios and gradient
    norms over two steps of two updates, with each rank holding about half the parameters and moments."""
    import shutil

    from conftest import write_rl_run

    url, served, reset = rollout_server
    start = tmp_path / "start"  # the starting checkpoint: the server's folder is a copy, which the pushes overwrite
    shutil.copytree(served, start)
    server = f"rollout_backend: server, server_url: '{url}', server_weights_dir: '{served}', server_concurrency: 1"
    config = write_rl_run(tmp_path, start, monkeypatch, server)
    run(config, f"output_dir={tmp_path / 'one'}", "per_device_train_batch_size=2", command="rl")
    one = rows(tmp_path / "one")
    assert len(one) == 2
    for engine in ("fsdp2", "zero3"):
        reset()
        out = tmp_path / engine
        accelerate = accelerate_file(engine, tmp_path / "accelerate")
        run(config, f"output_dir={out}", "per_device_train_batch_size=1", command="rl", accelerate=accelerate)
        two = rows(out)
        assert [r["num_responses"] for r in two] == [16, 16]
        for key in ("reward/mean", "response_length/mean", "loss", "ratio_mean", "ratio_max", "clip_fraction"):
            assert [r[key] for r in two] == pytest.approx([r[key] for r in one], abs=1e-5), (engine, key)
        assert [r["grad_norm"] for r in two] == pytest.approx([r["grad_norm"] for r in one], rel=1e-4), engine
        report, single = engine_report(out), engine_report(tmp_path / "one")
        assert report["engine"] == NAMES[engine] and report["num_processes"] == 2
        (params,) = single["parameter_bytes_per_rank"]
        assert all(b / params == pytest.approx(0.5, abs=0.05) for b in report["parameter_bytes_per_rank"])
