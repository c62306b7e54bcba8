"""Through the CLI: no command runs a model folder's code, final/ keeps the starting model's dtype, and a LoRA
adapter merges into its base from any working directory."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import make_colour_dataset, write_jsonl, write_meta
from safetensors.torch import load_file

from internvl_tune.checkpoints.convert import weight_files
from internvl_tune.checkpoints.metadata import METADATA_FILE
from internvl_tune.checkpoints.write import BASE_RECORD
from internvl_tune.cli import main
from internvl_tune.testing.original_checkpoint import build_original_checkpoint
from internvl_tune.testing.tiny import build_tiny_model

TINY = ["grad_checkpoint=false", "max_dynamic_patch=2", "max_steps=1", "warmup_ratio=0", "save_steps=0"]


def _dtypes(path) -> set[torch.dtype]:
    return {t.dtype for file in weight_files(path) for t in load_file(file).values()}


def _config(path, model, meta):
    path.write_text(f"model: {{model_name_or_path: {model}}}\ndata: {{meta_path: {meta}}}\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """SFT data, preference data and a run file for each."""
    root = tmp_path_factory.mktemp("data")
    sft_meta = make_colour_dataset(root / "sft", num=2)
    pairs = [
        {"image": "0.png", "question": "What colour is the shape?", "chosen": "red", "rejected": "blue"},
        {"question": "Hello!", "chosen": "Hi!", "rejected": "No."},
    ]
    write_jsonl(root / "pairs.jsonl", pairs)
    pair_meta = write_meta(
        root / "pairs.json", {"p": {"root": str(root / "sft" / "images"), "annotation": "pairs.jsonl"}}
    )
    return root, sft_meta, pair_meta


def test_no_command_runs_a_model_folders_code(tmp_path, data):
    """Every released original checkpoint has `auto_map` in config.json (and InternLM2 ones in
    tokenizer_config.json): transformers' Auto classes stopped at "Do you wish to run the custom code? [y/N]",
    and "y" imported the folder's Python files. Here those files leave a marker when imported."""
    root, sft_meta, pair_meta = data
    model = tmp_path / "original"
    build_original_checkpoint(model)
    marker = tmp_path / "marker"
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py", "tokenization_internlm2.py"):
        (model / name).write_text(f"open({str(marker)!r}, 'a').write({name!r})\n")
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert "auto_map" in json.loads((model / "config.json").read_text())

    sft_yaml = _config(tmp_path / "sft.yaml", model, sft_meta)
    mpo_yaml = _config(tmp_path / "mpo.yaml", model, pair_meta)
    commands = [
        ["convert", str(model), str(tmp_path / "hf"), "--to", "hf"],
        ["export", str(model), str(tmp_path / "export")],
        ["chat", str(model), "Hello!", "--max-new-tokens", "2"],
        ["check-data", str(sft_meta), "--model", str(model)],
        # LoRA with gradient checkpointing: the two warnings such runs printed are checked below too.
        [
            "sft",
            "--config",
            str(sft_yaml),
            *TINY,
            "grad_checkpoint=true",
            "use_llm_lora=2",
            f"output_dir={tmp_path / 'sft'}",
        ],
        ["export", str(tmp_path / "sft" / "final_adapter"), str(tmp_path / "merged"), "--merge-lora"],
        ["mpo", "--config", str(mpo_yaml), *TINY, "drop_path_rate=0", f"output_dir={tmp_path / 'mpo'}"],
    ]
    # One interpreter runs the commands one after another through the CLI's entry point (a process per command
    # costs a minute more here); stdin is closed, so a prompt would read EOF.
    script = (
        "import json, sys\n"
        "from internvl_tune.cli import main\n"
        "for command in json.loads(sys.argv[1]):\n"
        "    print(f'=== {command[0]}: rc', main(command), flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(commands)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=900,
    )
    output = result.stdout
    assert result.returncode == 0, output[-3000:]
    assert [f"=== {c[0]}: rc 0" for c in commands] == [line for line in output.splitlines() if line.startswith("===")]
    assert "custom code" not in output and "[y/N]" not in output
    assert "to instantiate a model of type" not in output
    assert "is_gradient_checkpointing` is deprecated" not in output and "use_cache=True` is incompatible" not in output
    assert not marker.exists(), f"imported: {marker.read_text()}"


def test_final_weights_keep_the_starting_dtype(tmp_path, data):
    _, sft_meta, _ = data
    model_dir = tmp_path / "bf16"
    model, tokenizer = build_tiny_model()
    model.to(torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = _config(tmp_path / "sft.yaml", model_dir, sft_meta)

    assert main(["sft", "--config", str(config), *TINY, f"output_dir={tmp_path / 'auto'}"]) == 0
    assert _dtypes(tmp_path / "auto" / "final") == {torch.bfloat16}  # trained in fp32, saved as it came
    assert json.loads((tmp_path / "auto" / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    assert main(["sft", "--config", str(config), *TINY, "save_dtype=fp32", f"output_dir={tmp_path / 'fp32'}"]) == 0
    assert _dtypes(tmp_path / "fp32" / "final") == {torch.float32}

    assert main(["convert", str(tmp_path / "auto" / "final"), str(tmp_path / "orig"), "--to", "original"]) == 0
    assert _dtypes(tmp_path / "orig") == {torch.bfloat16}
    assert main(["export", str(tmp_path / "orig"), str(tmp_path / "half"), "--dtype", "fp16"]) == 0
    assert _dtypes(tmp_path / "half") == {torch.float16}


@pytest.mark.parametrize("layout", ["original", "relative"])
def test_lora_export_finds_its_base_from_another_directory(tmp_path, data, monkeypatch, tiny_model_dir, layout):
    """The adapter recorded its base as "None" (a run from an original-layout folder) or as the path relative
    to where training ran; `export --merge-lora` without --base then failed."""
    _, sft_meta, _ = data
    work = tmp_path / "work"
    work.mkdir()
    if layout == "original":
        build_original_checkpoint(work / "base")
    else:
        shutil.copytree(tiny_model_dir, work / "base")
    monkeypatch.chdir(work)
    config = _config(work / "sft.yaml", "base", sft_meta)  # relative to the working directory
    assert main(["sft", "--config", str(config), *TINY, "use_llm_lora=2", "output_dir=run"]) == 0
    adapter = work / "run" / "final_adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((work / "base").resolve())
    assert json.loads((adapter / METADATA_FILE).read_text())[BASE_RECORD]["path"] == recorded

    monkeypatch.chdir(tmp_path)
    assert main(["export", str(adapter), "merged", "--merge-lora"]) == 0
    merged, final = (
        load_file(tmp_path / "merged" / "model.safetensors"),
        load_file(work / "run" / "final" / "model.safetensors"),
    )
    assert merged.keys() == final.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], final[name], atol=1e-6, rtol=1e-6)


def test_lora_export_refuses_a_changed_base_unless_named(tmp_path, data, monkeypatch, capsys):
    _, sft_meta, _ = data
    base = tmp_path / "base"
    model, tokenizer = build_tiny_model()
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    config = _config(tmp_path / "sft.yaml", base, sft_meta)
    assert main(["sft", "--config", str(config), *TINY, "use_llm_lora=2", f"output_dir={tmp_path / 'run'}"]) == 0
    build_tiny_model(seed=1)[0].save_pretrained(base)  # the base is overwritten after training

    adapter = str(tmp_path / "run" / "final_adapter")
    capsys.readouterr()
    assert main(["export", adapter, str(tmp_path / "merged"), "--merge-lora"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "changed since training" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()
    assert main(["export", adapter, str(tmp_path / "merged"), "--merge-lora", "--base", str(base)]) == 0
