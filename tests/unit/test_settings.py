"""One home for each pipeline setting: `PipelineSettings` (data/settings.py) declares the fields and defaults that the run
config (`DataArgs`), the samples and prompts (`SampleSettings`) and checkpoint metadata share."""

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from internvl_tune.checkpoints.metadata import (
    METADATA_FILE,
    checkpoint_sample_settings,
    checkpoint_settings,
    metadata_for,
    set_chat_template,
)
from internvl_tune.checkpoints.read import read_model_config
from internvl_tune.config import ConfigError, DataArgs, PipelineSettings, SFTConfig, field_docs, load_config
from internvl_tune.constants import DEFAULT_MAX_DYNAMIC_PATCH, DEFAULT_TEMPLATE
from internvl_tune.data.transform import SampleSettings
from internvl_tune.model.prepare import sample_settings

SRC = Path(__file__).resolve().parents[2] / "src"


def test_data_args_and_sample_settings_agree_field_by_field():
    pipeline = {f.name for f in dataclasses.fields(PipelineSettings)}
    shared = {f.name for f in dataclasses.fields(DataArgs)} & {f.name for f in dataclasses.fields(SampleSettings)}
    assert shared == pipeline and len(pipeline) == 14
    data, sample = DataArgs(), SampleSettings()
    assert {name: getattr(data, name) for name in shared} == {name: getattr(sample, name) for name in shared}
    assert data.conv_style == sample.template == DEFAULT_TEMPLATE
    assert data.max_dynamic_patch == DEFAULT_MAX_DYNAMIC_PATCH
    docs = field_docs(DataArgs)
    assert docs["max_dynamic_patch"].startswith("Most tiles per image") and docs["meta_path"].startswith("Meta JSON")


def test_the_default_tile_budget_is_written_once():
    """An integer literal equal to the default tile budget on a line about tiles or patches is in constants.py only
    (docstring examples are strings, not literals); the rest of the code names DEFAULT_MAX_DYNAMIC_PATCH."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Constant) and type(node.value) is int and node.value == DEFAULT_MAX_DYNAMIC_PATCH:
                line = lines[node.lineno - 1]
                if re.search(r"patch|tile|max_num", line, re.IGNORECASE):
                    found.append(f"{path.relative_to(SRC).as_posix()}: {line.strip()}")
    assert found == [f"internvl_tune/constants.py: DEFAULT_MAX_DYNAMIC_PATCH = {DEFAULT_MAX_DYNAMIC_PATCH}"]


def test_run_files_and_overrides_keep_their_keys(tmp_path):
    """The `data` keys of run files and overrides are as before; the model-bound fields of SampleSettings are not
    config keys."""
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "model: {model_name_or_path: m}\n"
        "data: {meta_path: meta.json, conv_style: Hermes-2, max_dynamic_patch: 6, pad2square: true}\n"
    )
    config = load_config(SFTConfig, run_file, ["data.min_dynamic_patch=2", "use_thumbnail=false", "max_seq_length=512"])
    d = config.data
    assert (d.conv_style, d.max_dynamic_patch, d.pad2square, d.min_dynamic_patch) == ("Hermes-2", 6, True, 2)
    assert (d.use_thumbnail, d.max_seq_length) == (False, 512)
    for key in ("template", "image_size", "num_image_token"):
        with pytest.raises(ConfigError, match="unknown field"):
            load_config(SFTConfig, run_file, [f"data.{key}=1"])


def test_a_checkpoint_without_metadata_gets_the_run_defaults(tiny_model_dir):
    """Chat and evaluation of a folder that records nothing tile as a run with default data settings trains."""
    config = read_model_config(tiny_model_dir)
    assert not (tiny_model_dir / METADATA_FILE).exists()
    assert checkpoint_sample_settings(tiny_model_dir, config) == sample_settings(DataArgs(), config)


def test_checkpoint_metadata_carries_the_run_settings(tiny_model_dir, tmp_path):
    """The metadata training writes (`metadata_for` of the run's SampleSettings) reads back as the same settings,
    pad2square included (it was not recorded, so chat stretched what training had padded)."""
    config = read_model_config(tiny_model_dir)
    data = DataArgs(
        conv_style="Hermes-2",
        system_message="Be brief.",
        use_thumbnail=False,
        min_dynamic_patch=2,
        max_dynamic_patch=6,
        normalize_type="clip",
        pad2square=True,
    )
    trained = sample_settings(data, config)
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    metadata = metadata_for(config, dataclasses.asdict(trained))
    (tmp_path / METADATA_FILE).write_text(json.dumps(metadata))
    assert metadata["image"]["max_dynamic_patch"] == 6 and metadata["image"]["pad2square"] is True
    assert checkpoint_sample_settings(tmp_path, config) == trained


def test_thinking_needs_a_template_with_a_thinking_mode(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("model: {model_name_or_path: m}\ndata: {meta_path: meta.json, conv_style: Hermes-2}\n")
    with pytest.raises(ConfigError, match="^data.thinking: template 'Hermes-2' has no thinking mode"):
        load_config(SFTConfig, run_file, ["data.thinking=true"])
    for template in ("internvl2_5", "internvl3_5_gpt_oss"):
        config = load_config(SFTConfig, run_file, ["data.thinking=true", f"data.conv_style={template}"])
        assert config.data.thinking is True


def test_checkpoint_metadata_carries_thinking_mode(tiny_model_dir, tmp_path):
    """A GPT-OSS run in thinking mode records it, with its resolved system message, and its chat template renders
    the thinking variant; reading the folder back gives the run's template and prompts."""
    from internvl_tune.data.templates import build_generation_prompt, get_template
    from internvl_tune.testing.tiny import build_tiny_tokenizer

    config = read_model_config(tiny_model_dir)
    trained = sample_settings(DataArgs(conv_style="internvl3_5_gpt_oss", thinking=True), config)
    metadata = metadata_for(config, dataclasses.asdict(trained))
    template = get_template("internvl3_5_gpt_oss", thinking=True)
    assert metadata["thinking"] is True and metadata["system_message"] == template.system_message
    assert "Reasoning: high" in metadata["system_message"]
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (tmp_path / METADATA_FILE).write_text(json.dumps(metadata))
    read = checkpoint_sample_settings(tmp_path, config)
    assert (read.template, read.thinking) == ("internvl3_5_gpt_oss", True)
    assert read.system_message == template.system_message
    tokenizer = build_tiny_tokenizer(harmony=True)
    set_chat_template(tokenizer, metadata)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hm</think>Hello!"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered.endswith(
        "<|start|>assistant<|channel|>analysis<|message|>hm<|end|><|start|>assistant"
        "<|channel|>final<|message|>Hello!<|return|>"
    )
    assert tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True) == (
        build_generation_prompt(template, messages[:1])
    )


def test_template_comes_from_the_checkpoint_not_its_folder_name(tmp_path):
    """A folder named like a GPT-OSS model that records internvl2_5 gets internvl2_5, and an original-layout folder
    named like an InternVL3 model whose config says internvl3_5_gpt_oss gets that; an unrecorded one the default."""
    hf = tmp_path / "InternVL3_5-GPT-OSS-20B-A4B-Preview-HF"
    hf.mkdir()
    (hf / METADATA_FILE).write_text(json.dumps({"template": "internvl2_5"}))
    assert checkpoint_settings(hf)["template"] == "internvl2_5"
    original = tmp_path / "InternVL3-1B"
    original.mkdir()
    config = {"architectures": ["InternVLChatModel"], "template": "internvl3_5_gpt_oss", "llm_config": {}}
    (original / "config.json").write_text(json.dumps(config))
    assert checkpoint_settings(original)["template"] == "internvl3_5_gpt_oss"
    assert checkpoint_settings(original)["thinking"] is False
    bare = tmp_path / "InternVL3_5-GPT-OSS-20B-A4B-Preview"
    bare.mkdir()
    assert checkpoint_settings(bare)["template"] == DEFAULT_TEMPLATE


def test_training_samples_follow_data_thinking(tiny_model_dir):
    """`data.thinking` reaches the sample builder training uses: the thinking system message, the analysis channel."""
    from internvl_tune.data.transform import SampleBuilder
    from internvl_tune.testing.tiny import build_tiny_tokenizer

    config = read_model_config(tiny_model_dir)
    tokenizer = build_tiny_tokenizer(harmony=True)
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<think>hm</think>Hello!"}]}
    texts = {}
    for thinking in (False, True):
        settings = sample_settings(DataArgs(conv_style="internvl3_5_gpt_oss", thinking=thinking), config)
        sample = SampleBuilder(tokenizer, settings)(record, "test:1", None, rng=None)
        texts[thinking] = tokenizer.decode(sample["input_ids"])
    assert "Reasoning: low" in texts[False]
    assert texts[False].endswith("<|start|>assistant<|channel|>final<|message|><think>hm</think>Hello!<|return|>")
    assert "Reasoning: high" in texts[True]
    assert texts[True].endswith(
        "<|start|>assistant<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>"
        "Hello!<|return|>"
    )
