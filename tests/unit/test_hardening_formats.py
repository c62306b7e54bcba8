"""Model folders in both layouts: configs and tokenizers read without remote code, quiet loading, saved dtypes,
whole-or-nothing output folders, LoRA adapters that check their base, and chat templates for list contents."""

import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file

from internvl_tune.checkpoints import write as checkpoint_write
from internvl_tune.checkpoints.convert import ConversionError, weight_files
from internvl_tune.checkpoints.metadata import METADATA_FILE
from internvl_tune.checkpoints.read import checkpoint_dtype, load_tokenizer, read_model_config
from internvl_tune.checkpoints.write import BASE_RECORD, base_model_record, convert_to_hf, convert_to_original
from internvl_tune.data.templates import TEMPLATES, build_generation_prompt, chat_template_jinja, get_template
from internvl_tune.model import save as model_save
from internvl_tune.model.load import load_model
from internvl_tune.model.lora import apply_lora
from internvl_tune.model.save import adapter_base, export_checkpoint
from internvl_tune.testing.original_checkpoint import build_original_checkpoint
from internvl_tune.testing.tiny import build_tiny_model, build_tiny_tokenizer
from internvl_tune.training.checkpoint import save_adapter


def _dtypes(path) -> set[torch.dtype]:
    return {t.dtype for file in weight_files(path) for t in load_file(file).values()}


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("original") / "model"
    build_original_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """A tiny HF-layout model stored in bf16, as the released checkpoints are."""
    path = tmp_path_factory.mktemp("bf16") / "model"
    model, tokenizer = build_tiny_model()
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# No remote code, no noise


def _architecture(config) -> dict:
    """A config's content without what loading adds (the dtype loaded in, the folder's path)."""
    return {
        k: _architecture(v) if isinstance(v, dict) else v
        for k, v in (config if isinstance(config, dict) else config.to_dict()).items()
        if k not in ("dtype", "_name_or_path")
    }


def test_configs_of_both_layouts_are_read_as_json(original_dir, tiny_model_dir):
    model, _ = load_model(original_dir)
    assert _architecture(read_model_config(original_dir)) == _architecture(model.config)
    config = read_model_config(tiny_model_dir)
    assert (
        config.model_type == "internvl" and config.image_token_id == load_model(tiny_model_dir)[0].config.image_token_id
    )


def test_loading_an_original_folder_is_quiet(original_dir, caplog, capfd):
    """transformers warned 'You are using a model of type internvl_chat to instantiate a model of type ``' on
    every original-layout load (AutoTokenizer fell back to a blank config after refusing the remote code)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING):
            load_model(original_dir)
            load_tokenizer(original_dir)
            read_model_config(original_dir)
    out, err = capfd.readouterr()
    for text in (out, err, caplog.text):
        assert "to instantiate a model of type" not in text
        assert "custom code" not in text


def test_lora_raises_no_deprecation_warning(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT's read of `is_gradient_checkpointing` warned on every LoRA run
        apply_lora(model, use_llm_lora=2, use_backbone_lora=2)


# ---------------------------------------------------------------------------------------------------------------
# Dtypes


def test_checkpoint_dtype_reads_safetensors_headers_then_the_config(bf16_dir, tiny_model_dir, tmp_path):
    assert checkpoint_dtype(bf16_dir) == torch.bfloat16
    assert checkpoint_dtype(tiny_model_dir) == torch.float32
    # .bin weights: the config's torch_dtype (the original fixture writes "bfloat16" there)
    build_original_checkpoint(tmp_path / "bin", weight_format="bin", num_shards=1)
    assert checkpoint_dtype(tmp_path / "bin") == torch.bfloat16


def test_conversions_keep_the_source_dtype_or_cast_when_asked(bf16_dir, tmp_path):
    convert_to_original(bf16_dir, tmp_path / "orig")
    assert _dtypes(tmp_path / "orig") == {torch.bfloat16}
    assert json.loads((tmp_path / "orig" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    convert_to_hf(tmp_path / "orig", tmp_path / "hf")
    assert _dtypes(tmp_path / "hf") == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    convert_to_hf(tmp_path / "orig", tmp_path / "hf16", dtype="fp16")
    assert _dtypes(tmp_path / "hf16") == {torch.float16}

    export_checkpoint(bf16_dir, tmp_path / "export")  # loads in fp32, writes the source's bf16
    assert _dtypes(tmp_path / "export") == {torch.bfloat16}
    assert json.loads((tmp_path / "export" / "config.json").read_text())["dtype"] == "bfloat16"
    export_checkpoint(bf16_dir, tmp_path / "export32", dtype="fp32")
    assert _dtypes(tmp_path / "export32") == {torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# Whole or nothing


def _fail(*args, **kwargs):
    raise OSError("disk full")


@pytest.mark.parametrize("to", ["hf", "original"])
def test_a_failed_export_leaves_the_previous_folder_whole(tiny_model_dir, tmp_path, monkeypatch, to):
    dst = tmp_path / "out"
    export_checkpoint(tiny_model_dir, dst, to=to)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    # The last writers of each layout: by then the weights are on disk.
    if to == "hf":
        monkeypatch.setattr(model_save, "write_processor_files", _fail)
    else:
        monkeypatch.setattr(checkpoint_write, "copy_tokenizer_files", _fail)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(tiny_model_dir, dst, to=to)
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial or temporary folder


def test_a_failed_conversion_leaves_no_folder(original_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_write, "write_processor_files", _fail)
    with pytest.raises(OSError):
        convert_to_hf(original_dir, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_adapter_save_leaves_the_previous_adapter_whole(tiny_model_dir, tmp_path, monkeypatch):
    model, tokenizer = load_model(tiny_model_dir)
    model = apply_lora(model, use_llm_lora=2)
    dst = tmp_path / "final_adapter"
    save_adapter(model, tokenizer, dst, {}, model.state_dict())
    assert json.loads((dst / METADATA_FILE).read_text())[BASE_RECORD] == base_model_record(tiny_model_dir)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    with torch.no_grad():  # the new adapter differs, so a half-written one would show
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    monkeypatch.setattr(tokenizer, "save_pretrained", _fail)  # fails after the adapter weights are written
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tokenizer, dst, {"other": 1}, model.state_dict())
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["final_adapter"]


def test_outputs_never_replace_a_folder_that_is_not_a_model(tiny_model_dir, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="not a model folder"):
        export_checkpoint(tiny_model_dir, tmp_path / "home")
    with pytest.raises(ConversionError, match="must differ"):
        convert_to_original(tiny_model_dir, tiny_model_dir)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters and their base


def _adapter(path, adapter_config: dict, metadata: dict):
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(adapter_config))
    (path / METADATA_FILE).write_text(json.dumps(metadata))
    return path


def test_adapter_base_errors_name_the_fix(tiny_model_dir, tmp_path, caplog):
    unknown = _adapter(tmp_path / "a", {"base_model_name_or_path": "None"}, {})
    with pytest.raises(ConversionError, match="does not record its base model; pass --base"):
        adapter_base(unknown, None)
    assert adapter_base(unknown, str(tiny_model_dir)) == tiny_model_dir

    relative = _adapter(tmp_path / "b", {"base_model_name_or_path": "runs/model"}, {})
    with pytest.raises(ConversionError, match="relative path.*pass --base"):
        adapter_base(relative, None)

    record = base_model_record(tiny_model_dir)
    assert record["path"] == str(tiny_model_dir.resolve())
    good = _adapter(tmp_path / "c", {"base_model_name_or_path": "elsewhere"}, {BASE_RECORD: record})
    assert adapter_base(good, None) == tiny_model_dir.resolve()  # our record first

    changed = _adapter(tmp_path / "d", {}, {BASE_RECORD: {**record, "fingerprint": "0" * 32}})
    with pytest.raises(ConversionError, match="changed since training.*pass --base"):
        adapter_base(changed, None)
    with caplog.at_level(logging.WARNING):
        assert adapter_base(changed, str(tiny_model_dir)) == tiny_model_dir  # explicit --base: a warning
    assert "changed since training" in caplog.text


# ---------------------------------------------------------------------------------------------------------------
# Chat templates


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_chat_template_renders_transformers_list_contents(name):
    template = get_template(name)
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = chat_template_jinja(template)
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "And "},
                {"type": "text", "text": "now?"},
            ],
        },
    ]
    strings = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is in the picture?"},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "<image>\n<image>\nAnd now?"},
    ]
    if not template.supports_system:
        parts, strings = parts[1:], strings[1:]
    expected = build_generation_prompt(template, strings)
    assert tokenizer.apply_chat_template(parts, tokenize=False, add_generation_prompt=True) == expected
    assert tokenizer.apply_chat_template(strings, tokenize=False, add_generation_prompt=True) == expected
    mixed = [strings[0], parts[1], *strings[2:]] if template.supports_system else [parts[0], *strings[1:]]
    assert tokenizer.apply_chat_template(mixed, tokenize=False, add_generation_prompt=True) == expected
    with pytest.raises(Exception, match="type text or image"):
        tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}], tokenize=False)
