"""The public API: each package's `__all__` resolves, and every ```python snippet of docs/python-api.md runs as
written (in order, in one namespace) in a folder of tiny stand-ins for the models and data it names."""

import importlib
import re
import shutil
from pathlib import Path

import pytest

from internvl_tune.demo.task import make_pairs, make_task
from internvl_tune.testing.original_checkpoint import build_original_checkpoint
from internvl_tune.testing.tiny import save_tiny_model

DOC = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"
PACKAGES = [
    "internvl_tune.checkpoints",
    "internvl_tune.data",
    "internvl_tune.generation",
    "internvl_tune.losses",
    "internvl_tune.model",
]


def snippets() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), flags=re.DOTALL | re.MULTILINE)


@pytest.mark.parametrize("name", PACKAGES)
def test_package_exports_resolve_to_their_modules(name):
    package = importlib.import_module(name)
    assert package.__all__
    for export in package.__all__:
        module = importlib.import_module(f"{name}.{package._EXPORTS[export]}")
        assert getattr(package, export) is getattr(module, export)
    namespace = {}
    exec(f"from {name} import *", namespace)
    assert set(package.__all__) <= namespace.keys()
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        _ = package.not_a_name


def test_recipes_train_functions():
    from internvl_tune.recipes import mpo, precompute_ref, sft

    assert callable(sft.train) and callable(mpo.train) and callable(precompute_ref.precompute_reference)


def test_docs_python_snippets_run(tmp_path, monkeypatch, tokenizer):
    blocks = snippets()
    assert len(blocks) >= 5
    source = "\n".join(blocks)
    for name in ("load_model", "convert_to_hf", "dynamic_preprocess", "preference_loss", "PreferenceObjective"):
        assert name in source
    for name in ("load_config", "sft.train", "mpo.train"):
        assert name in source
    save_tiny_model(tmp_path / "InternVL3-1B-hf")
    build_original_checkpoint(tmp_path / "InternVL2_5-8B", llm="internlm2", tokenizer=tokenizer)
    make_task(tmp_path / "data", num_train=2, num_eval=1, seed=0)
    pairs = make_pairs(make_task(tmp_path / "MMPR", num_train=2, num_eval=1, seed=1), seed=1)
    shutil.copyfile(pairs.train_meta, tmp_path / "MMPR" / "meta.json")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} snippet {i + 1}", "exec"), namespace)
    assert (tmp_path / "InternVL2_5-8B-original" / "config.json").is_file()
    assert (tmp_path / "runs" / "mpo" / "final" / "internvl_tune.json").is_file()
