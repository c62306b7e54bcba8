"""tools/min_requirements.py: the pins `make test-min` installs are the floors pyproject.toml declares."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("min_requirements", ROOT / "tools" / "min_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pins_are_the_declared_floors():
    pyproject = (ROOT / "pyproject.toml").read_text()
    pins = _tool().min_requirements(pyproject)
    assert [pin.split("==")[0] for pin in pins] == ["transformers", "accelerate", "peft"]
    for pin in pins:
        name, floor = pin.split("==")
        assert f'"{name}>={floor}' in pyproject


def test_a_dependency_without_a_floor_is_an_error():
    with pytest.raises(ValueError, match="'peft' has no '>=' floor"):
        _tool().min_requirements('dependencies = [\n    "transformers>=5.0",\n    "accelerate>=1.2",\n    "peft",\n]\n')
