"""A first try without a download, as the README's first section runs it: `tiny-model` writes a tiny InternVL in
either layout and a small dataset; `check-data`, `sft`, `mpo` and `plot` take them."""

import json
import subprocess
import sys

import pytest

from internvl_tune.checkpoints.convert import is_original_checkpoint
from internvl_tune.cli import main
from internvl_tune.demo.tiny_folder import NUM_EVAL, NUM_PROMPTS, NUM_TRAIN

RUN = ["grad_checkpoint=false", "max_dynamic_patch=2", "per_device_train_batch_size=4", "warmup_ratio=0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("first_try")
    assert main(["tiny-model", str(root / "tiny-hf"), "--data", str(root / "tiny-data")]) == 0
    assert main(["tiny-model", str(root / "tiny-orig"), "--layout", "original"]) == 0
    return root


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_model_writes_both_layouts_and_a_dataset_that_check_data_accepts(folders, capsys):
    hf, original, data = folders / "tiny-hf", folders / "tiny-orig", folders / "tiny-data"
    assert (hf / "model.safetensors").is_file() and not is_original_checkpoint(hf)
    assert is_original_checkpoint(original)
    assert len(_lines(data / "train.jsonl")) == len(_lines(data / "pairs_train.jsonl")) == NUM_TRAIN
    assert (
        len(_lines(data / "benchmark.jsonl")) == 3 * NUM_EVAL and len(_lines(data / "prompts.jsonl")) == 3 * NUM_PROMPTS
    )
    assert all((data / record["image"]).is_file() for record in _lines(data / "benchmark.jsonl"))
    assert not any(p.name.startswith(".") for p in folders.iterdir())  # no temporary folder left

    capsys.readouterr()
    assert main(["check-data", str(data / "meta.json"), "--model", str(original)]) == 0
    assert f"{NUM_TRAIN} samples" in capsys.readouterr().out
    assert main(["check-data", str(data / "pairs_train_meta.json"), "--model", str(hf), "--preference"]) == 0


def test_tiny_model_refuses_a_folder_that_holds_something(folders, capsys):
    assert main(["tiny-model", str(folders / "tiny-hf")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {folders / 'tiny-hf'} exists and is not empty: name a new folder or remove it\n"
    assert main(["tiny-model", str(folders / "new"), "--data", str(folders / "tiny-data")]) == 2
    assert not (folders / "new").exists()  # checked before anything is written


def test_sft_then_mpo_on_the_tiny_folders_then_plot_each_run(folders, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    data = folders / "tiny-data"
    sft_yaml, mpo_yaml = tmp_path / "sft.yaml", tmp_path / "mpo.yaml"
    sft_yaml.write_text(
        f"model: {{model_name_or_path: {folders / 'tiny-hf'}}}\ndata: {{meta_path: {data}/meta.json}}\n"
    )
    mpo_yaml.write_text(
        f"model: {{model_name_or_path: {tmp_path / 'sft' / 'final'}}}\n"
        f"data: {{meta_path: {data}/pairs_train_meta.json}}\n"
    )
    assert main(["sft", "--config", str(sft_yaml), *RUN, "max_steps=3", f"output_dir={tmp_path / 'sft'}"]) == 0
    args = [*RUN, "max_steps=2", "drop_path_rate=0", f"output_dir={tmp_path / 'mpo'}"]
    assert main(["mpo", "--config", str(mpo_yaml), *args]) == 0

    capsys.readouterr()
    # SFT logs 5 panels' metrics (loss, lr, grad norm, samples/s, tokens/s): two rows of three; MPO adds rewards and
    # reward accuracy: three rows.
    for run, height in (("sft", 720), ("mpo", 1080)):
        assert main(["plot", str(tmp_path / run)]) == 0
        png = tmp_path / run / "metrics.png"
        assert capsys.readouterr().out == f"wrote {png}\n"
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size == (1500, height)


def test_a_first_try_on_a_machine_without_a_gpu_prints_no_deepspeed_accelerator_notice(tmp_path):
    """transformers imports DeepSpeed (installed by `make`) with every model it loads; DeepSpeed's "Setting accelerator
    to CPU" warning would greet every command on a CPU machine. The CLI drops that one line (cli.py)."""
    pytest.importorskip("deepspeed")
    code = "import sys; from internvl_tune.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run(
        [sys.executable, "-c", code, "tiny-model", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "Setting accelerator" not in result.stdout + result.stderr
    assert "wrote" in result.stdout + result.stderr
