"""One home for each pipeline setting: `PipelineSettings` (data/settings.py) declares the fields and defaults that the run
config (`DataArgs`), the samples and prompts (`SampleSettings`) and checkpoint metadata share."""

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

from internvl_tune.checkpoints.metadata import METADATA_FILE, checkpoint_sample_settings, metadata_for
from internvl_tune.checkpoints.read import read_model_config
from internvl_tune.config import ConfigError, DataArgs, PipelineSettings, SFTConfig, field_docs, load_config
from internvl_tune.constants import DEFAULT_MAX_DYNAMIC_PATCH, DEFAULT_TEMPLATE
from internvl_tune.data.transform import SampleSettings
from internvl_tune.model.prepare import sample_settings

SRC = Path(__file__).resolve().parents[2] / "src"


def test_data_args_and_sample_settings_agree_field_by_field():
    pipeline = {f.name for f in dataclasses.fields(PipelineSettings)}
    shared = {f.name for f in dataclasses.fields(DataArgs)} & {f.name for f in dataclasses.fields(SampleSettings)}
    assert shared == pipeline and len(pipeline) == 11
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
